"""Triggers: compression during decoding and chunked prefill keep the cache within budget."""
from __future__ import annotations

import tempfile

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpipe
from kvpipe.runtime.store import RaggedStore
from kvpipe.runtime.tail import STATIC_TAIL_SLOTS

from conftest import kept_bytes_ratio, tiny_gates_file, tiny_model

TOKENS, EVERY = 24, 8


def decode_pipeline(prefill: bool = True) -> kvpipe.Pipeline:
    return kvpipe.build({"version": 1, "budget": {"tokens": TOKENS}, "trigger": {"prefill": prefill, "every": EVERY},
                         "stages": [{"stage": "sinks_window", "params": {"sinks": 2, "window": 4}},
                                    {"stage": "attention_mass", "params": {"window": 4}}, "uniform", "topk"]})


def record_peaks(model, handle) -> list[int]:
    """Slots held per head after every forward call (the model's own hook runs after kvpipe's)."""
    peaks = []
    model.register_forward_hook(lambda *_: peaks.append(int(handle.stats()["kept_tokens"].max())))
    return peaks


def stored_rows(store) -> int:
    """Tokens a store's tensors hold, counted from the tensors themselves (not from its ``lengths``)."""
    if store is None:
        return 0
    if isinstance(store, RaggedStore):
        return store.positions.numel()
    return int((store.pages.positions >= 0).sum()) + store.residual.positions.numel()


def test_decoding_stays_within_budget_over_512_tokens(random_ids):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(2, 40)
    with decode_pipeline().attach(model) as handle:
        peaks = record_peaks(model, handle)
        out = model.generate(ids, max_new_tokens=512, min_new_tokens=512, do_sample=False)
        stats = handle.stats()
    assert out.shape == (2, 552)
    assert stats["seen_tokens"] == 551
    assert max(peaks) <= TOKENS + EVERY - 1
    assert peaks.count(TOKENS) >= 512 // EVERY  # it really compressed, again and again
    assert kept_bytes_ratio(stats) > 551 / (TOKENS + EVERY)


def test_chunked_prefill_never_holds_the_whole_prompt(random_ids):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 96)
    with decode_pipeline(prefill=False).attach(model) as handle:
        peaks = record_peaks(model, handle)
        model.generate(ids, max_new_tokens=4, do_sample=False, prefill_chunk_size=EVERY)
        chunked = handle.stats()["kv_bytes_peak"]
        model.generate(ids, max_new_tokens=4, do_sample=False)
        whole = handle.stats()["kv_bytes_peak"]
    assert len(peaks) >= 96 // EVERY
    assert max(peaks) <= TOKENS + EVERY
    slot = 2 * 16 * 4  # fp32 K and V of one slot, head_dim 16
    assert whole >= 2 * 2 * 96 * slot  # the unchunked prompt is held whole before its first compression
    # decode steps write into static tails of STATIC_TAIL_SLOTS slots: memory reserved, and counted
    assert chunked <= 2 * 2 * (TOKENS + EVERY) * (slot + 4) + 2 * 2 * 4 + 2 * 2 * STATIC_TAIL_SLOTS * slot


def test_decode_compression_keeps_sinks_and_recent_tokens(random_ids):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, 30)
    with decode_pipeline().attach(model) as handle:
        cache = handle.cache()
        model.generate(ids, past_key_values=cache, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    seen = cache.get_seq_length()
    for layer in cache.layers:
        _, _, positions = layer.store.padded()
        tail = layer.tail_positions().tolist()
        for h in range(positions.shape[1]):
            held = positions[0, h, : int(layer.store.lengths[0, h])].tolist() + tail
            assert {0, 1} <= set(held) and seen - 1 in held
            assert held == sorted(set(held))


SCORERS = {"attention_mass": {"stage": "attention_mass", "params": {"window": 4}},
           "gates": {"stage": "retention_gates", "params": {"gates": tiny_gates_file(tempfile.mkdtemp())}}}


@settings(max_examples=20, deadline=None)
@given(st.integers(12, 40), st.integers(1, 12), st.lists(st.integers(1, 20), min_size=1, max_size=8),
       st.sampled_from(["uniform", "adaptive_heads", "global"]), st.sampled_from(["attention_mass", "gates"]),
       st.integers(0, 2**31 - 1))
def test_random_schedules_stay_within_budget(tokens, every, chunks, allocator, scorer, seed):
    """Feed random-sized chunks through a plain forward loop: after every call each head holds at most
    budget + every - 1 slots (or every token, when compressing would have stored more bytes than it freed),
    positions stay sorted and unique, and the sinks are never lost."""
    model = tiny_model("llama", "sdpa")
    pipeline = kvpipe.build({"version": 1, "budget": {"tokens": tokens}, "trigger": {"prefill": True, "every": every},
                             "stages": [{"stage": "sinks_window", "params": {"sinks": 2, "window": 2}},
                                        SCORERS[scorer], allocator, "topk"]})
    generator = torch.Generator().manual_seed(seed)
    seen = 0
    with pipeline.attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        for size in [max(tokens, 8)] + chunks:
            model(torch.randint(2, 250, (1, size), generator=generator), past_key_values=cache)
            seen += size
            assert cache.get_seq_length() == seen
            for layer in cache.layers:
                held = layer.kept_slots()
                if allocator == "uniform" and layer.store is not None:
                    assert int(held.max()) <= tokens + every - 1
                elif layer.store is None:       # never compressed, or compressing it would not have saved a byte
                    assert int(held.max()) == seen and (seen <= tokens or cache.layers_kept_whole == 2)
                # what stats report (per-head lengths) against the rows the store's tensors really hold
                assert int(held.sum() - layer.tail_length * held.numel()) == stored_rows(layer.store)
                if layer.store is not None:
                    _, _, positions = layer.store.padded()
                    for h in range(positions.shape[1]):
                        pos = positions[0, h, : int(layer.store.lengths[0, h])].tolist()
                        pos += layer.tail_positions().tolist()
                        assert pos == sorted(set(pos)) and {0, 1} <= set(pos)
            total = sum(int(layer.store.lengths.sum()) for layer in cache.layers if layer.store is not None)
            assert total <= tokens * 2 * 2  # pooled allocators share layers x heads x budget
