"""The ``reconstruction`` stage (KVzip's scores) and the probe forward that feeds it."""
from __future__ import annotations

import pytest
import torch

import kvpipe
from kvpipe.errors import KVPipeError
from kvpipe.models import cache_arg

from conftest import fresh_seed, tiny_model

CONTEXT = 48


def reconstruction_pipeline(chunk: int, prompt: str = "", keep: float = 0.5, normalize: str = "none"):
    return kvpipe.build({"version": 1, "budget": {"keep": keep}, "stages": [
        {"stage": "reconstruction", "params": {"prompt": prompt, "chunk": chunk, "normalize": normalize}},
        "uniform", "topk"]})


def written_per_input(model, layer: int, hidden: torch.Tensor, n: int) -> torch.Tensor:
    """KVzip+'s weights for one layer of one eager forward, ``[B, Hq, q - n, n]``: ``‖W_O^h v_i‖ / ‖x_t‖`` for
    each re-reading token t (x: the attention's input, after the layer's input norm) and context token i."""
    block = model.model.layers[layer]
    x = block.input_layernorm(hidden).float()                                            # [B, q, D_model]
    heads, dim = model.config.num_attention_heads, model.config.head_dim
    values = block.self_attn.v_proj(x[:, :n]).view(x.shape[0], n, -1, dim)             # [B, n, Hkv, D]
    values = values.repeat_interleave(heads // values.shape[2], dim=2)                   # [B, n, Hq, D]
    w_o = block.self_attn.o_proj.weight.float().view(-1, heads, dim)                     # [D_model, Hq, D]
    written = torch.einsum("bnhd,mhd->bhnm", values, w_o).norm(dim=-1)                   # [B, Hq, n]
    return written[:, :, None, :] / x[:, n:].norm(dim=-1)[:, None, :, None]


def reference_scores(model, ids: torch.Tensor, chunk: int, normalize: str = "none") -> list[torch.Tensor]:
    """Per layer ``[B, Hkv, n]``: the most attention each context token gets from a second reading of the
    context, ``chunk`` tokens at a time, each chunk read right after the context alone (KVzip's chunked
    repeat), over those queries and the query heads of its KV head — from plain eager forwards, without kvpipe.
    ``plus``: each probability weighted by ``written_per_input`` first (KVzip+)."""
    n = ids.shape[1]
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    scores = None
    for start in range(0, n, chunk):
        with torch.inference_mode():
            out = model(torch.cat([ids, ids[:, start:start + chunk]], 1), output_attentions=True,
                        output_hidden_states=True)
            weighted = [attention[:, :, n:, :n].float() for attention in out.attentions]    # [B, Hq, w, n]
            if normalize == "plus":
                weighted = [p * written_per_input(model, layer, out.hidden_states[layer], n)
                            for layer, p in enumerate(weighted)]
        best = [w.amax(2) for w in weighted]                                                # [B, Hq, n]
        best = [b.view(b.shape[0], -1, groups, n).amax(2) for b in best]
        scores = best if scores is None else [torch.maximum(a, b) for a, b in zip(scores, best)]
    return scores


@pytest.mark.parametrize("chunk,normalize", [(7, "none"), (64, "none"), (7, "plus"), (64, "plus")])
def test_the_probe_scores_are_the_attention_of_reading_the_context_again(chunk, normalize):
    model = tiny_model("llama", "eager", seed=fresh_seed() % 1000)
    generator = torch.Generator().manual_seed(fresh_seed())
    ids = torch.randint(2, 250, (1, CONTEXT), generator=generator)
    expected = reference_scores(model, ids, chunk, normalize)
    with reconstruction_pipeline(chunk, normalize=normalize).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(ids, **cache_arg(model, cache))
        stats = handle.stats(cache)
    assert cache.get_seq_length() == CONTEXT, "the probe extended the cache itself"
    assert stats["probe_seconds"] > 0 and (stats["kept_tokens"] == CONTEXT // 2).all()
    for layer, scores in zip(cache.layers, expected):
        positions = layer.store.padded()[2]                                             # [B, Hkv, kept]
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, positions, True)
        # the kept half holds the highest reference scores (up to float rounding at the boundary)
        lowest_kept = scores.masked_fill(~kept, float("inf")).amin(-1)
        highest_dropped = scores.masked_fill(kept, float("-inf")).amax(-1)
        assert (lowest_kept >= highest_dropped - 1e-5).all(), (lowest_kept, highest_dropped)


def test_a_repeat_prompt_needs_the_tokenizer_at_attach():
    model = tiny_model()
    with pytest.raises(KVPipeError, match="'reconstruction' encodes its repeat prompt.*tokenizer=tokenizer"):
        reconstruction_pipeline(16, prompt="Repeat the previous context exactly.").attach(model)
    assert model.config._attn_implementation == "sdpa"          # a refused attach leaves the model as it was


def test_generate_runs_with_reconstruction_and_a_prompt(smollm):
    model, tokenizer = smollm
    ids = tokenizer("The capital of the small republic is Karlsborg. " * 12, return_tensors="pt").input_ids
    pipeline = reconstruction_pipeline(64, prompt="\n\nRepeat the previous context exactly.\n\n", keep=0.25)
    with pipeline.attach(model, tokenizer) as handle:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        stats = handle.stats()
    assert out.shape[1] == ids.shape[1] + 4 and stats["probe_seconds"] > 0
    assert stats["kept_tokens"].float().mean() < 0.3 * ids.shape[1]
