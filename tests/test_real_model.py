"""The embedded SmolLM2-135M-Instruct through attach(), forward and generate(). Loaded once per session."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvpipe
from kvpipe.core.shipped import names, path
from kvpipe.eval.tasks import make_cases

from conftest import kept_bytes_ratio

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def prompt(smollm):
    _, tokenizer = smollm
    case = make_cases(tokenizer, 540, 1, seed=3)[0]  # over 2x the 256 slots of decode-budget
    return case


def logits_through(model, ids, steps=3, cache=None):
    cache = cache if cache is not None else DynamicCache(config=model.config)
    with torch.inference_mode():
        out = [model(ids, past_key_values=cache).logits[:, -1]]
        for t in range(steps):
            out.append(model(torch.tensor([[100 + t]]), past_key_values=cache).logits[:, -1])
    return torch.stack(out)


def test_noop_attach_and_detach_are_bit_identical(smollm, prompt):
    model, _ = smollm
    before = logits_through(model, prompt.ids)
    with kvpipe.build(path("noop")).attach(model) as handle:
        attached = logits_through(model, prompt.ids, cache=handle.cache())
    after = logits_through(model, prompt.ids)
    assert (attached - before).abs().max().item() == 0.0
    assert torch.equal(after, before)


def test_default_pipeline_generates_and_frees_half(smollm, prompt):
    model, tokenizer = smollm
    ids = prompt.ids
    with kvpipe.build(path("default")).attach(model) as handle:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        stats = handle.stats()
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
    assert kept_bytes_ratio(stats) >= 1.9
    seen = ids.shape[1] + 19
    assert stats["seen_tokens"] == seen
    kept = stats["kept_tokens"]
    assert kept.shape == (30, 1, 3)
    assert bool((kept == ids.shape[1] // 2 + 19).all())  # half the prompt + the 19 tokens fed while decoding


def test_positions_continue_after_eviction(smollm, prompt):
    model, _ = smollm
    ids = prompt.ids
    nxt = torch.tensor([[504]])
    results = {}
    with kvpipe.build(path("default")).attach(model) as handle, torch.inference_mode():
        for name, position in (("implicit", None), ("logical", ids.shape[1]), ("kept", ids.shape[1] // 2)):
            cache = handle.cache()
            model(ids, past_key_values=cache)
            kwargs = {} if position is None else {"position_ids": torch.tensor([[position]])}
            results[name] = model(nxt, past_key_values=cache, **kwargs).logits
    assert torch.equal(results["implicit"], results["logical"])
    assert (results["implicit"] - results["kept"]).abs().max() > 0.1


def test_left_padded_batch_matches_single_prompts(smollm):
    model, tokenizer = smollm
    cases = make_cases(tokenizer, 300, 2, seed=11)
    texts = [tokenizer.decode(c.ids[0]) for c in cases]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert batch.attention_mask[:, 0].tolist().count(0) == 1  # one row really is padded
    with kvpipe.build(path("default")).attach(model):
        together = model.generate(**batch, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        alone = [model.generate(tokenizer(t, return_tensors="pt", add_special_tokens=False).input_ids,
                                max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
                 for t in texts]
    width = batch.input_ids.shape[1]
    for row, single in enumerate(alone):
        assert together[row, width:].tolist() == single[0, -10:].tolist()


@pytest.mark.parametrize("pipeline_path", sorted(path("default").parent.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_pipeline_generates(smollm, prompt, pipeline_path):
    model, tokenizer = smollm
    ids = prompt.ids
    with kvpipe.build(pipeline_path).attach(model, tokenizer) as handle:     # the tokenizer: for probing stages
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        stats = handle.stats()
    assert out.shape[1] == ids.shape[1] + 4
    if kvpipe.build(pipeline_path).compresses:
        assert kept_bytes_ratio(stats) > 1.8
    else:
        assert stats["compression_ratio"] == 1.0


def test_decode_budget_holds_over_512_generated_tokens(smollm, prompt):
    model, tokenizer = smollm
    pipeline = kvpipe.build(path("decode-budget"))
    budget, every = pipeline.spec.budget.tokens, pipeline.spec.trigger.every
    with pipeline.attach(model) as handle:
        peaks = []
        hook = model.register_forward_hook(lambda *_: peaks.append(int(handle.stats()["kept_tokens"].max())))
        try:
            out = model.generate(prompt.ids, attention_mask=torch.ones_like(prompt.ids), max_new_tokens=512,
                                 min_new_tokens=512, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        finally:
            hook.remove()
        stats = handle.stats()
    assert out.shape[1] == prompt.ids.shape[1] + 512
    assert max(peaks) <= budget + every - 1
    full_slot, slot = 2 * 64 * 4, 2 * 64 * 4 + 4  # fp32 K and V per slot; the store adds an int32 position
    assert kept_bytes_ratio(stats) > (prompt.ids.shape[1] + 511) / (budget + every) * full_slot / slot


@pytest.mark.parametrize("name", names())
def test_every_shipped_pipeline_generates_from_short_prompts(smollm, name):
    """A chat user's short first turn: prompts shorter than the protected sinks and window are kept whole (the
    budget is reported as not met) instead of refused; nothing crashes inside generate(). One left-padded batch
    holds prompts of 1, 10, 40 and 135 tokens."""
    model, tokenizer = smollm
    generator = torch.Generator().manual_seed(11)
    lengths = (1, 10, 40, 135)
    ids = torch.randint(10, 40000, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths)) >= max(lengths) - torch.tensor(lengths)[:, None]).long()
    with kvpipe.build(name).attach(model, tokenizer) as handle:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        stats = handle.stats()
    assert out.shape == (len(lengths), max(lengths) + 2)
    assert stats["budget_met"] == (stats["budget_shortfall"] == 0)


def test_a_prompt_shorter_than_the_protected_window_is_kept_and_reported(smollm):
    model, _ = smollm
    ids = torch.randint(10, 40000, (1, 40), generator=torch.Generator().manual_seed(12))
    with kvpipe.build("default").attach(model) as handle:               # keep 0.5, 4 sinks + 64 window
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
        stats = handle.stats()
    assert not stats["budget_met"] and stats["budget_shortfall"] > 0
    assert int(stats["kept_tokens"][:, 0].min()) >= 40                  # every prompt token kept
    strict = kvpipe.build("default").spec.model_dump(mode="python", exclude_none=True) | {"strict": True}
    with kvpipe.build(strict).attach(model):
        with pytest.raises(kvpipe.BudgetError, match="strict: true"):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
