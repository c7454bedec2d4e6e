"""attach()/detach() on tiny random models: exactness, eviction semantics, positions, padding, refusals."""
from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import kvpipe
from kvpipe import UnsupportedModelError
from kvpipe.core.shipped import path

from conftest import kept_bytes_ratio, tiny_model
from hybrid_models import deepseek_v3

NOOP = {"version": 1, "stages": []}


def evicting(keep: float = 0.5, scorer: str = "attention_mass", window: int = 8) -> kvpipe.Pipeline:
    return kvpipe.build({"version": 1, "budget": {"keep": keep}, "stages": [
        {"stage": "sinks_window", "params": {"sinks": 2, "window": window}}, scorer, "uniform", "topk"]})


def decode_logits(model, ids, steps: int = 4, cache=None):
    """Prefill ``ids`` then feed ``steps`` fixed tokens one by one; returns the logits of every call."""
    cache = cache if cache is not None else DynamicCache(config=model.config)
    out = [model(ids, past_key_values=cache).logits]
    for t in range(steps):
        out.append(model(torch.full((ids.shape[0], 1), 7 + t), past_key_values=cache).logits)
    return out, cache


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_noop_pipeline_is_bit_identical(kind, attn, random_ids):
    model = tiny_model(kind, attn, **({"sliding_window": None} if kind == "mistral" else {}))
    ids = random_ids(2, 40)
    reference, _ = decode_logits(model, ids)
    with kvpipe.build(NOOP).attach(model) as handle:
        attached, _ = decode_logits(model, ids, cache=handle.cache())
        generated = model.generate(ids, max_new_tokens=6, do_sample=False)
    for ref, got in zip(reference, attached):
        assert (ref - got).abs().max().item() == 0.0
    assert torch.equal(generated, model.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_detach_restores_bit_identical_outputs(attn, random_ids):
    model = tiny_model("llama", attn)
    ids = random_ids(1, 64)
    before, _ = decode_logits(model, ids)
    with evicting().attach(model):
        model.generate(ids, max_new_tokens=4, do_sample=False)
        assert model.config._attn_implementation == f"kvpipe_{attn}"
    assert model.config._attn_implementation == attn
    after, _ = decode_logits(model, ids)
    for a, b in zip(before, after):
        assert torch.equal(a, b)


def kept_positions(cache) -> list[list[list[torch.Tensor]]]:
    """Per layer, row and KV head: the logical positions the compressed cache kept."""
    out = []
    for layer in cache.layers:
        _, _, positions = layer.store.padded()
        lengths = layer.store.lengths
        out.append([[positions[b, h, : int(lengths[b, h])] for h in range(lengths.shape[1])]
                    for b in range(lengths.shape[0])])
    return out


def test_compacted_cache_equals_masking_the_full_cache(random_ids):
    """Physical per-head eviction must compute exactly what attention over the full cache with the evicted
    slots masked out computes (the reference does not touch kvpipe's cache or attention code)."""
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 96)
    with evicting(0.4).attach(model) as handle:
        compressed, cache = decode_logits(model, ids, steps=3, cache=handle.cache())
        kept = kept_positions(cache)
    assert any(len(kept[0][0][0]) != len(h) or not torch.equal(kept[0][0][0], h) for h in kept[1][0])

    def masked_sdpa(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1:  # decode: mask evicted prompt slots per KV head
            allowed = torch.ones(key.shape[0], key.shape[1], key.shape[2], dtype=torch.bool)
            allowed[..., : ids.shape[1]] = False
            for h, positions in enumerate(kept[module.layer_idx][0]):
                allowed[0, h, positions] = True
            groups = query.shape[1] // key.shape[1]
            attention_mask = allowed.repeat_interleave(groups, dim=1)[:, :, None, :]
        return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("test_masked", masked_sdpa)
    AttentionMaskInterface.register("test_masked", sdpa_mask)
    model.set_attn_implementation("test_masked")
    reference, _ = decode_logits(model, ids, steps=3)
    model.set_attn_implementation("sdpa")
    # Same math, different SDPA kernels (the masked call takes the math path, the compacted one the fused
    # path), so rounding differs: over 30 seeds the gap peaked at 16 ulp of the largest logit. Moving a
    # single kept slot in one head of layer 0 costs at least 160 ulp, so 32 ulp still separates right from
    # wrong by 5x.
    for ref, got in zip(reference[1:], compressed[1:]):
        ulp = torch.finfo(ref.dtype).eps * ref.abs().max().item()
        torch.testing.assert_close(got, ref, rtol=0, atol=32 * ulp)


def test_positions_continue_from_logical_length(random_ids):
    """After eviction a plain forward must use position = tokens seen, not tokens kept."""
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 80)
    nxt = torch.tensor([[11]])
    with evicting(0.5).attach(model) as handle:
        cache = handle.cache()
        model(ids, past_key_values=cache)
        assert cache.get_seq_length() == 80
        physical = int(cache.layers[0].kept_slots().max())
        assert physical == 40
        implicit = model(nxt, past_key_values=cache).logits
        cache2 = handle.cache()
        model(ids, past_key_values=cache2)
        explicit = model(nxt, past_key_values=cache2, position_ids=torch.tensor([[80]])).logits
        cache3 = handle.cache()
        model(ids, past_key_values=cache3)
        wrong = model(nxt, past_key_values=cache3, position_ids=torch.tensor([[physical]])).logits
    assert torch.equal(implicit, explicit)
    assert (implicit - wrong).abs().max() > 1e-3


def test_generate_resumes_from_a_compressed_cache(random_ids):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 60)
    question = random_ids(1, 5)
    with evicting(0.5).attach(model) as handle:
        cache = handle.cache()
        model(ids, past_key_values=cache)
        kept_before = cache.layers[0].kept_slots().clone()
        out = model.generate(torch.cat([ids, question], -1), past_key_values=cache, max_new_tokens=5,
                             do_sample=False)
        stats = handle.stats()
    assert out.shape[1] == 70
    assert cache.get_seq_length() == 69  # the last generated token is never fed
    # the question and the decoded tokens are appended uncompressed after the prefill compression
    assert torch.equal(cache.layers[0].kept_slots(), kept_before + 9)
    assert stats["seen_tokens"] == 69


def test_left_padded_batch_matches_each_prompt_alone(random_ids):
    model = tiny_model("llama", "sdpa")
    long, short = random_ids(1, 64), random_ids(1, 41)
    pad = torch.zeros(1, 64 - 41, dtype=torch.long)
    batch = torch.cat([long, torch.cat([pad, short], -1)])
    mask = torch.cat([torch.ones(1, 64), torch.cat([torch.zeros(1, 23), torch.ones(1, 41)], -1)]).long()
    with evicting(0.5).attach(model) as handle:
        together = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
        stats = handle.stats()
        alone_long = model.generate(long, max_new_tokens=8, do_sample=False)
        alone_short = model.generate(short, max_new_tokens=8, do_sample=False)
    assert torch.equal(together[0, 64:], alone_long[0, 64:])
    assert torch.equal(together[1, 64:], alone_short[0, 41:])
    # per-row budgets follow the real token count; padding is never kept
    assert stats["kept_tokens"][0, :, 0].tolist() == [32 + 7, 20 + 7]


def test_beam_search_reorders_the_compressed_cache(random_ids):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 48)
    with evicting(0.5).attach(model):
        out = model.generate(ids, max_new_tokens=5, num_beams=3, do_sample=False)
    assert out.shape == (1, 53)


def test_use_cache_false_passes_through(random_ids):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 30)
    reference = model(ids, use_cache=False).logits
    with evicting().attach(model):
        assert torch.equal(model(ids, use_cache=False).logits, reference)


def test_stats_measure_real_storage(random_ids):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 200)
    with evicting(0.5).attach(model) as handle:
        cache = handle.cache()
        model(ids, past_key_values=cache)
        stats = handle.stats(cache)
    layers, heads, head_dim = 2, 2, 16
    kept = 100
    expected = layers * (heads * kept * (2 * head_dim * 4 + 4) + heads * 4)
    assert stats["kv_bytes"] == expected
    assert stats["kv_bytes_full"] == layers * heads * 200 * 2 * head_dim * 4
    assert stats["compression_ratio"] >= 1.9
    assert stats["kept_tokens"].shape == (layers, 1, heads)
    assert bool((stats["kept_tokens"] == kept).all())


def test_refuses_foreign_and_filled_caches(random_ids):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 20)
    filled = DynamicCache(config=model.config)
    model(ids, past_key_values=filled)
    with evicting().attach(model):
        with pytest.raises(UnsupportedModelError, match="StaticCache"):
            model(ids, past_key_values=StaticCache(config=model.config, max_cache_len=64))
        with pytest.raises(UnsupportedModelError, match="already holds tokens"):
            model(ids, past_key_values=filled)


def test_refuses_double_attach_and_unsupported_attention():
    model = tiny_model("llama", "sdpa")
    handle = evicting().attach(model)
    with pytest.raises(UnsupportedModelError, match="already attached"):
        evicting().attach(model)
    handle.detach()
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        evicting().attach(model)


@pytest.mark.parametrize("kind", ["qwen2", "qwen3", "mistral"])
def test_eviction_works_on_other_architectures(kind, random_ids):
    model = tiny_model(kind, "sdpa", **({"sliding_window": None} if kind == "mistral" else {}))
    ids = random_ids(1, 64)
    with evicting(0.5).attach(model) as handle:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        stats = handle.stats()
    assert out.shape[1] == 68 and kept_bytes_ratio(stats) > 1.7


def test_detached_cache_cannot_be_reused(random_ids):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 40)
    with evicting().attach(model) as handle:
        cache = handle.cache()
        model(ids, past_key_values=cache)
    with pytest.raises(UnsupportedModelError, match="detached"):
        model(torch.tensor([[3]]), past_key_values=cache)


def test_random_scorer_differs_from_attention_mass(random_ids):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 120)
    chosen = {}
    for scorer in ("attention_mass", "random"):
        with evicting(0.3, scorer).attach(model) as handle:
            cache = handle.cache()
            model(ids, past_key_values=cache)
            chosen[scorer] = kept_positions(cache)[1][0][0]
    assert len(chosen["random"]) == len(chosen["attention_mass"]) == 36
    assert not torch.equal(chosen["random"], chosen["attention_mass"])


def test_default_pipeline_file_attaches(random_ids):
    model = tiny_model("llama", "sdpa")
    with kvpipe.build(path("default")).attach(model) as handle:
        model.generate(random_ids(1, 300), max_new_tokens=3, do_sample=False)
        assert kept_bytes_ratio(handle.stats()) > 1.9


def test_refuses_latent_attention_with_the_reason():
    model = deepseek_v3()
    with pytest.raises(UnsupportedModelError, match="multi-head latent attention.*kv_lora_rank=16"):
        kvpipe.build("int4").attach(model)
    assert getattr(model, "_kvpipe_session", None) is None
    model.generate(torch.randint(2, 100, (1, 8)), max_new_tokens=2, do_sample=False)    # untouched


@pytest.mark.parametrize("name", ["int4", "value-aware-int4", "int4-then-evict"])
def test_quantized_pipelines_on_a_left_padded_batch_of_short_prompts(name):
    """Partly used 128-token pages once made the padded width exceed the tokens seen, and transformers' mask
    offset went negative (IndexError inside masking)."""
    model = tiny_model()
    ids = torch.randint(2, 250, (2, 30), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    with kvpipe.build(name).attach(model) as handle:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        kept = handle.stats()["kept_tokens"]
    assert out.shape == (2, 35)
    assert int(kept[:, 1].max()) <= 20 + 5                    # padding never stored


def test_attach_is_all_or_nothing(monkeypatch):
    model = tiny_model()
    ids = torch.randint(2, 250, (1, 40), generator=torch.Generator().manual_seed(6))
    before = model(ids).logits

    def refuse(*args, **kwargs):
        raise RuntimeError("set_attn_implementation failed")
    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    with pytest.raises(RuntimeError, match="set_attn_implementation failed"):
        kvpipe.build("default").attach(model)
    monkeypatch.undo()
    assert getattr(model, "_kvpipe_session", None) is None
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert torch.equal(model(ids).logits, before)
    with kvpipe.build("default").attach(model):                # a new attach works
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("name", ["int4", "int2", "value-aware-int4", "int4-then-evict", "default"])
def test_manual_forward_with_gradients_enabled(name):
    """Training-style code calls the model with autograd on: the cache compresses under no_grad and the new
    tokens keep their graph (the stored part is constants)."""
    model = tiny_model()
    ids = torch.randint(2, 250, (1, 300), generator=torch.Generator().manual_seed(7))
    with kvpipe.build(name).attach(model) as handle:
        cache = handle.cache()
        model(ids, past_key_values=cache, use_cache=True)
        logits = model(ids[:, :2], past_key_values=cache, use_cache=True).logits
        logits.sum().backward()
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())


def test_stats_after_detach_says_why():
    model = tiny_model()
    handle = kvpipe.build("default").attach(model)
    ids = torch.randint(2, 250, (1, 200), generator=torch.Generator().manual_seed(8))
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    handle.detach()
    with pytest.raises(UnsupportedModelError, match="detached.*stats\\(cache=...\\)"):
        handle.stats()


def test_a_cache_given_to_another_model_is_refused_on_first_use():
    model, other = tiny_model(), tiny_model(num_attention_heads=2, num_key_value_heads=1, seed=1)
    ids = torch.randint(2, 250, (1, 20), generator=torch.Generator().manual_seed(9))
    with kvpipe.build("default").attach(model) as handle:
        with pytest.raises(UnsupportedModelError, match="use handle.cache\\(\\) only with the model it came from"):
            other(ids, past_key_values=handle.cache(), use_cache=True)


@pytest.mark.parametrize("name", ["default", "int4", "value-aware-int4"])
def test_reorder_cache_moves_every_rows_tokens(name):
    """Beam search reorders rows: each layer's stored keys, values and positions follow, exactly."""
    model = tiny_model()
    ids = torch.randint(2, 250, (3, 300), generator=torch.Generator().manual_seed(10))
    with kvpipe.build(name).attach(model) as handle:
        cache = handle.cache()
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
        before = [layer.view(None) for layer in cache.layers]
        order = torch.tensor([2, 0, 0])
        cache.reorder_cache(order)
        after = [layer.view(None) for layer in cache.layers]
    for old, new in zip(before, after):
        width = new.valid.shape[-1]                      # rows 1 and 2 of old may have held more per head
        assert not bool(old.valid[order][..., width:].any())
        assert not torch.equal(old.keys[:, :, :width], new.keys)
        for field in ("keys", "values", "positions", "valid"):
            assert torch.equal(getattr(new, field), getattr(old, field)[order][:, :, :width]), field
