"""Quantized storage in the cache: flushing, byte accounting, composition with eviction, backends, real model."""
from __future__ import annotations

import sys

import pytest
import torch

import kvpipe
from kvpipe.errors import KVPipeError, UnsupportedModelError
from kvpipe.eval.fidelity import fidelity
from kvpipe.eval.tasks import paragraphs
from kvpipe.runtime.backend import resolve_backend
from kvpipe.runtime.quantized_store import QuantizedStore, roundtrip

from conftest import kept_bytes_ratio, tail_bytes, tiny_model


def quantize_spec(backend: str = "torch", keep: float | None = None, first: bool = False, **params) -> dict:
    quantize = {"stage": "quantize", "params": {"group_size": 32, "residual": 8, **params}}
    if keep is None:
        return {"version": 1, "backend": backend, "stages": [quantize]}
    evict = [{"stage": "sinks_window", "params": {"sinks": 2, "window": 8}}, "knorm", "adaptive_heads", "topk"]
    return {"version": 1, "backend": backend, "budget": {"keep": keep},
            "stages": [quantize, *evict] if first else [*evict, quantize]}


def test_decoding_flushes_whole_pages_and_keeps_the_window(random_ids):
    model = tiny_model()
    ids = random_ids(2, 70)
    with kvpipe.build(quantize_spec(bits=4)).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(ids, past_key_values=cache)
        for _ in range(75):                                   # more than two pages of new tokens
            model(random_ids(2, 1), past_key_values=cache)
        stats = handle.stats(cache)
    for layer in cache.layers:
        store = layer.store
        assert isinstance(store, QuantizedStore)
        # every token is somewhere, exactly once, in order: pages, residual, tail
        _, _, positions = store.padded()
        held = torch.cat([positions[0, 0][store.valid()[0, 0]], layer.tail_positions()])
        assert torch.equal(held, torch.arange(145))
        # at least `residual` newest tokens unquantized, never a whole page more than that
        fp = store.residual.lengths + layer.tail_length
        assert bool((fp >= 8).all()) and bool((fp < 8 + 2 * 32).all())
    assert stats["kv_bytes"] == sum(layer.store.analytic_bytes() + tail_bytes(layer) for layer in cache.layers)
    assert kept_bytes_ratio(stats) > 2


@pytest.mark.parametrize("first", [False, True], ids=["evict-then-quantize", "quantize-then-evict"])
def test_quantization_composes_with_eviction(first, random_ids):
    model = tiny_model()
    ids = random_ids(1, 96)
    with kvpipe.build(quantize_spec(keep=0.5, first=first, bits=4)).attach(model) as handle:
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        stats = handle.stats()
    assert out.shape == (1, 102)
    assert int(stats["kept_tokens"][:, 0].sum(-1).max()) <= 2 * (48 + 6)    # evicted to the budget per layer
    assert kept_bytes_ratio(stats) > 3     # evicted *and* packed (2x by eviction alone)


def test_stages_after_quantize_see_what_the_cache_returns(random_ids):
    """The preview given to later stages equals the dequantized store, slot for slot."""
    model = tiny_model()
    pipeline = kvpipe.build(quantize_spec(bits=2))
    with pipeline.attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(random_ids(1, 80), past_key_values=cache)
    quant = pipeline.storage_stage.storage(16)
    for layer in cache.layers:
        keys, values, positions = layer.store.padded()
        valid = layer.store.valid()
        # undo the packing: a dense tensor of the same tokens, then the preview of it
        dense_keys, dense_values = keys[valid].view(1, 2, -1, 16), values[valid].view(1, 2, -1, 16)
        dense_positions = positions[valid].view(1, 2, -1)
        everything = torch.ones_like(dense_positions, dtype=torch.bool)
        preview_keys, preview_values = roundtrip(dense_keys, dense_values, dense_positions, everything, quant)
        # the cache quantized original values, the preview quantizes dequantized ones: same grid, same codes
        assert torch.allclose(preview_keys, dense_keys, atol=1e-3) and torch.allclose(preview_values, dense_values,
                                                                                     atol=1e-3)


def test_byte_budget_counts_quantized_slots(random_ids):
    model = tiny_model()
    spec = quantize_spec(bits=4)
    spec["budget"] = {"bytes": 0.3}
    spec["stages"] = [{"stage": "sinks_window", "params": {"sinks": 2, "window": 8}}, "knorm", "uniform", "topk",
                      *spec["stages"]]
    with kvpipe.build(spec).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(random_ids(1, 200), past_key_values=cache)
        stats = handle.stats(cache)
    assert stats["kv_bytes"] <= 0.3 * stats["kv_bytes_full"]
    # a 4-bit slot is ~6x cheaper than an fp32 one, so the byte budget keeps far more than 30% of the tokens
    assert float(stats["kept_tokens"].float().mean()) > 0.6 * 200


@pytest.mark.parametrize("method", ["hqq", "quanto"])
def test_library_backends_store_the_same_format(method, random_ids):
    model = tiny_model()
    with kvpipe.build(quantize_spec(method=method, bits=4)).attach(model) as handle:
        out = model.generate(random_ids(1, 80), max_new_tokens=4, do_sample=False)
        store = handle.session.last_cache.layers[0].store
    assert out.shape == (1, 84) and isinstance(store, QuantizedStore) and store.pages.count > 0


def test_missing_backend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "hqq", None)
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)
    with pytest.raises(KVPipeError, match=r"pip install 'kvpipe\[hqq\]'"):
        kvpipe.build(quantize_spec(method="hqq"))


def test_backend_resolution_refuses_what_cannot_run(monkeypatch):
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UnsupportedModelError, match="needs a CUDA model"):
        resolve_backend("triton", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises((UnsupportedModelError, ValueError)):
        resolve_backend("auto", torch.device("cuda"))


def test_two_quantize_stages_are_refused():
    spec = quantize_spec()
    spec["stages"] = [spec["stages"][0], {**spec["stages"][0], "id": "again"}]
    with pytest.raises(KVPipeError, match="decide how the cache is stored"):
        kvpipe.build(spec)


def test_fused_triton_decode_generates_like_the_torch_path(random_ids):
    """The whole path on the triton backend (Triton's interpreter on CPU): same greedy tokens, close logits."""
    pytest.importorskip("triton")
    model = tiny_model()
    ids = random_ids(1, 70)
    runs = {}
    for backend in ("torch", "triton"):
        with kvpipe.build(quantize_spec(backend, keep=0.6, bits=4)).attach(model):
            runs[backend] = model.generate(ids, max_new_tokens=5, do_sample=False, output_scores=True,
                                           return_dict_in_generate=True)
    assert torch.equal(runs["torch"].sequences, runs["triton"].sequences)
    for a, b in zip(runs["torch"].scores, runs["triton"].scores):
        assert float((a - b).abs().max()) < 1e-3 * float(a.abs().max())


# --- the real model -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prose(smollm):
    _, tokenizer = smollm
    ids = tokenizer("\n".join(paragraphs()[200:400]), return_tensors="pt").input_ids
    return ids[:, :500], ids[:, 500:628]


@pytest.mark.real_model
@pytest.mark.parametrize("bits,limit", [(8, 1e-3), (4, 2e-2), (2, None)])
def test_kl_to_the_full_cache_on_real_text(smollm, prose, bits, limit):
    model, _ = smollm
    result = fidelity(model, kvpipe.build(quantize_spec(bits=bits, group_size=64, residual=32)), *prose)
    print(f"int{bits}: KL {result.kl:.2e} nats/token, ppl {result.ppl_full:.2f} -> {result.ppl:.2f}")
    assert result.kl >= 0 and torch.isfinite(torch.tensor(result.ppl))
    if limit is not None:
        assert result.kl < limit


@pytest.mark.real_model
def test_int8_barely_changes_greedy_output_and_int4_pipeline_holds_under_a_third(smollm, prose):
    model, _ = smollm
    context = prose[0]
    full = model.generate(context, max_new_tokens=20, do_sample=False)[0, 500:]
    with kvpipe.build(quantize_spec(bits=8, group_size=64, residual=32)).attach(model):
        int8 = model.generate(context, max_new_tokens=20, do_sample=False)[0, 500:]
    assert int((full != int8).sum()) <= 3
    with kvpipe.build("int4").attach(model) as handle:
        model.generate(context, max_new_tokens=2, do_sample=False)
        stats = handle.stats()
    assert stats["kv_bytes"] - stats["tail_reserve_bytes"] < 0.33 * stats["kv_bytes_full_16bit"]


def test_beam_search_reorders_packed_pages(random_ids):
    model = tiny_model()
    ids = random_ids(1, 80)
    with kvpipe.build(quantize_spec(keep=0.6, bits=4)).attach(model) as handle:
        out = model.generate(ids, max_new_tokens=40, num_beams=3, do_sample=False)
        store = handle.session.last_cache.layers[0].store
    assert out.shape == (1, 120)
    assert isinstance(store, QuantizedStore) and store.page_counts.shape[0] == 3     # one row per beam
    assert store.pages.count == int(store.page_counts.sum())


def test_decode_trigger_on_a_quantized_cache_stays_in_budget(random_ids):
    """Eviction every 16 new tokens on packed pages: the survivors are re-packed, the budget holds."""
    model = tiny_model()
    spec = quantize_spec(bits=4)
    spec["budget"], spec["trigger"] = {"tokens": 40}, {"prefill": True, "every": 16}
    spec["stages"] = [{"stage": "sinks_window", "params": {"sinks": 2, "window": 8}}, "knorm", "uniform", "topk",
                      *spec["stages"]]
    with kvpipe.build(spec).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(random_ids(1, 100), past_key_values=cache)
        for step in range(64):
            model(random_ids(1, 1), past_key_values=cache)
            held = cache.layers[0].kept_slots()
            assert int(held.max()) <= 40 + 16, step                      # budget plus one trigger interval
        assert all(isinstance(layer.store, QuantizedStore) for layer in cache.layers)
        assert handle.stats(cache)["kv_bytes"] == sum(layer.store.analytic_bytes() + tail_bytes(layer)
                                                      for layer in cache.layers)


@pytest.mark.parametrize("counts", [(27, 27, 27), (27, 19, 33), (3, 4, 4)],
                         ids=["aligned", "ragged", "same-pages-ragged-residual"])
def test_layout_skips_unused_page_slots_only_when_heads_align(counts):
    """A compaction leaves a partly used page; later flushes put whole pages after it. Aligned heads see a
    hole-free layout (no mask needed); ragged heads keep holes, marked invalid. Either way the valid slots,
    in order, are exactly the stored tokens, dequantized."""
    from kvpipe.core.quantization import Quantization
    from kvpipe.kernels.pages import PageFormat
    torch.manual_seed(3)
    batch, heads, n, dim, group = 2, 3, 50, 16, 8
    quant = Quantization(PageFormat(key_bits=8, value_bits=8, group=group, value_group=dim,
                                      scale_dtype=torch.float16), residual=4)
    keys, values = torch.randn(batch, heads, n, dim), torch.randn(batch, heads, n, dim)
    positions = torch.arange(n).expand(batch, heads, n)
    equal_heads = len(set(counts)) == 1
    keep = torch.rand(batch, heads, n).argsort(-1) < torch.tensor(counts)[:, None]
    store = QuantizedStore.from_padded(keys, values, positions, keep, quant)           # 23 slots: a partial page
    more_k, more_v = torch.randn(batch, heads, 20, dim), torch.randn(batch, heads, 20, dim)
    store = store.append(more_k, more_v, torch.arange(n, n + 20).expand(batch, heads, 20))   # 2 more pages
    got_k, got_v, got_pos = store.padded()
    assert store.all_valid == equal_heads and got_pos.shape[-1] == store.width
    tail_k = torch.randn(batch, heads, 1, dim)
    att_k, _ = store.attend(tail_k, tail_k)
    assert att_k.shape[-2] == store.width + 1 and torch.equal(att_k[..., :-1, :], got_k)
    all_k = torch.cat([keys, more_k], -2)
    for b in range(batch):
        for h in range(heads):
            valid = got_pos[b, h] >= 0
            want = torch.cat([positions[b, h][keep[b, h]], torch.arange(n, n + 20)])
            assert torch.equal(got_pos[b, h][valid], want)
            # 8-bit codes: each key within half a step of its group's range (< 1e-2 for these inputs)
            torch.testing.assert_close(got_k[b, h][valid], all_k[b, h][want], atol=2e-2, rtol=0)


def quantize_case(seed: int, batch: int = 2, heads: int = 2, n: int = 100, dim: int = 16):
    generator = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(batch, heads, n, dim, generator=generator) for _ in range(2))
    keys[..., :2] *= 20                                                   # outlier channels, as real keys have
    valid = torch.rand(batch, heads, n, generator=generator) < 0.8
    return keys, values, torch.arange(n).expand(batch, heads, n), valid


def test_preview_roundtrip_is_what_the_cache_returns():
    """Stages after `quantize` see ``roundtrip``: exactly the stored values, which are not the inputs."""
    keys, values, positions, valid = quantize_case(3)
    quant = kvpipe.build(quantize_spec(bits=4, residual=8)).storage_stage.storage(keys.shape[-1])
    k, v = roundtrip(keys, values, positions, valid, quant)
    store = QuantizedStore.from_padded(keys, values, positions, valid, quant)
    stored_k, stored_v, stored_pos = store.padded()
    for seen, stored in ((k, stored_k), (v, stored_v)):
        for b in range(2):
            for h in range(2):
                picked = seen[b, h][valid[b, h]]
                assert torch.equal(picked, stored[b, h, : picked.shape[0]])
    error = float((k - keys)[valid].norm() / keys[valid].norm())
    assert 0.002 < error < 0.1, error                # 4-bit error: neither zero (identity) nor garbage


def test_stored_scale_is_the_group_range_over_the_code_count():
    """Step = (max - min) / (2^b - 1), rounded up to float16: a coarser step would still meet "error <= step/2"."""
    keys, values, positions, valid = quantize_case(4, n=128)
    valid = torch.ones_like(valid)
    for bits in (2, 4, 8):
        quant = kvpipe.build(quantize_spec(bits=bits, residual=0)).storage_stage.storage(keys.shape[-1])
        store = QuantizedStore.from_padded(keys, values, positions, valid, quant)
        pages = keys.float().reshape(-1, 32, keys.shape[-1])                 # full pages of 32 tokens, per head
        want = (pages.amax(1) - pages.amin(1)) / (2 ** bits - 1)
        got = store.pages.key_scale.float()[: want.shape[0]]
        assert bool((got >= want).all()) and bool((got <= want * (1 + 2 ** -10) + 1e-7).all()), bits


@pytest.mark.parametrize("method", ["hqq", "quanto"])
def test_library_ranges_are_as_accurate_as_min_max(method):
    """hqq and quanto choose their own ranges; garbage ranges would leave every format test green but not this."""
    pytest.importorskip({"hqq": "hqq", "quanto": "optimum.quanto"}[method])
    keys, values, positions, valid = quantize_case(5)
    errors = {}
    for name in ("kivi", method):
        quant = kvpipe.build(quantize_spec(method=name, bits=4, residual=0)).storage_stage.storage(keys.shape[-1])
        k, v = roundtrip(keys, values, positions, valid, quant)
        errors[name] = float(torch.cat([(k - keys)[valid], (v - values)[valid]]).norm()
                             / torch.cat([keys[valid], values[valid]]).norm())
    assert 0 < errors[method] <= 1.5 * errors["kivi"], errors
