"""Attention over a compressed layer builds its per-head mask a block of query rows at a time (a long prefill
chunk over a compressed cache would otherwise hold q × kv bytes per head), and one mask for all heads when
every head keeps every slot. Both must change nothing but memory."""
from __future__ import annotations

import pytest
import torch

import kvpipe
from kvpipe.runtime import attention
from kvpipe.runtime.store import ValidSlots

from conftest import tiny_model

PROMPT, CHUNK = 48, 40


def evicting(allocator: str) -> kvpipe.Pipeline:
    """Keeps 30 % of each row's real tokens: a padded batch's rows keep different counts, so it has empty slots
    whatever the allocator; in one unpadded row, ``uniform`` fills every slot of every head."""
    return kvpipe.build({"version": 1, "budget": {"keep": 0.3}, "trigger": {"prefill": True},
                         "stages": [{"stage": "sinks_window", "params": {"sinks": 2, "window": 4}},
                                    {"stage": "attention_mass", "params": {"window": 4}}, allocator, "topk"]})


def chunk_after_compression(model, pipeline, ids, padding, calls: list | None = None) -> torch.Tensor:
    """Logits of a ``CHUNK``-token forward over a cache compressed after a ``PROMPT``-token prefill; ``calls``
    collects (query rows, mask) of every base-attention call of the chunk."""
    with pipeline.attach(model) as handle:
        cache = handle.cache()
        model(ids[:, :PROMPT], attention_mask=padding[:, :PROMPT], past_key_values=cache)
        session = model.model.layers[0].self_attn._kvpipe_session
        base = session.base_attention

        def spy(module, query, key, value, mask, **kwargs):
            if calls is not None:
                calls.append((query.shape[2], mask))
            return base(module, query, key, value, mask, **kwargs)

        session.base_attention = spy
        return model(ids[:, PROMPT:], attention_mask=padding, past_key_values=cache).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_row_blocks_give_the_same_logits_and_bound_each_mask(attn, random_ids, monkeypatch):
    model = tiny_model("llama", attn)
    ids = random_ids(2, PROMPT + CHUNK)
    padding = torch.ones_like(ids)
    padding[1, :5] = 0                                              # left padding in the second row
    whole = chunk_after_compression(model, evicting("adaptive_heads"), ids, padding)
    cap = 2000
    monkeypatch.setattr(attention, "MASK_BLOCK_BYTES", cap)
    calls = []
    blocked = chunk_after_compression(model, evicting("adaptive_heads"), ids, padding, calls)
    torch.testing.assert_close(blocked, whole, rtol=1e-5, atol=1e-5)
    assert len(calls) > 2 * CHUNK // 10                            # two layers, several blocks each
    for rows, mask in calls:
        assert rows < CHUNK and mask.shape[1] == 4 and mask[..., 0].numel() * mask.shape[-1] <= cap


def test_a_layer_whose_heads_keep_every_slot_gets_one_mask_for_all_heads(random_ids, monkeypatch):
    model = tiny_model("llama", "sdpa")
    ids = random_ids(1, PROMPT + CHUNK)
    padding = torch.ones_like(ids)                                 # an HF mask exists, but no slot is padding
    calls = []
    shared = chunk_after_compression(model, evicting("uniform"), ids, padding, calls)
    assert calls and all(rows == CHUNK and mask.shape[1] == 1 for rows, mask in calls)
    monkeypatch.setattr(ValidSlots, "all_valid", property(lambda self: False))
    per_head = chunk_after_compression(model, evicting("uniform"), ids, padding)
    torch.testing.assert_close(shared, per_head, rtol=1e-5, atol=1e-5)
