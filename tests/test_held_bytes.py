"""``stats()["held_bytes"]``: every byte of tensor storage a cache keeps alive, and little of it beyond the KV."""
from __future__ import annotations

import gc
import types

import pytest
import torch

from kvpipe.models import cache_arg

from conftest import fresh_seed, shipped_pipeline, tiny_model

OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType)


def storage_reachable(root: object) -> int:
    """Bytes of the distinct storages of every tensor the garbage collector can reach from ``root`` (an
    independent walk: ``gc.get_referents``, not kvpipe's attribute walk)."""
    seen, stack, storages = set(), [root], {}
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, OPAQUE):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        stack.extend(gc.get_referents(obj))
    return sum(storages.values())


@pytest.mark.parametrize("name", ["int4", "value-aware-int4", "default"])
def test_held_bytes_is_the_reachable_storage_and_close_to_the_kv(tmp_path, name):
    """A padded bf16 batch (heads of unequal lengths: the layouts that once held 24 bytes of indices a token)."""
    model = tiny_model(head_dim=64, hidden_size=128).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(fresh_seed())
    ids = torch.randint(2, 250, (2, 600), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    with shipped_pipeline(name, tmp_path).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        out = model(ids, attention_mask=mask, **cache_arg(model, cache))
        for _ in range(5):
            mask = torch.cat([mask, mask.new_ones(2, 1)], -1)
            out = model(out.logits[:, -1:].argmax(-1), attention_mask=mask, **cache_arg(model, cache))
        stats = handle.stats(cache)
    reachable = storage_reachable(cache)
    assert abs(stats["held_bytes"] - reachable) <= 0.02 * reachable, (stats["held_bytes"], reachable)
    assert stats["kv_bytes"] <= stats["held_bytes"] <= 1.05 * stats["kv_bytes"], stats


def test_stats_is_typed_reads_as_a_dict_and_its_reference_page_is_current(tmp_path):
    from pathlib import Path

    from kvpipe.runtime.stats import Stats, stats_reference

    model = tiny_model()
    with shipped_pipeline("default", tmp_path).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(torch.randint(2, 250, (1, 300)), **cache_arg(model, cache))
        stats = handle.stats(cache)
    assert isinstance(stats, Stats) and stats["kv_bytes"] == stats.kv_bytes == dict(stats)["kv_bytes"] > 0
    assert set(stats) == set(stats.dict()) and len(stats) == len(Stats.__dataclass_fields__)
    assert stats.kv_bytes <= stats.held_bytes and stats.compression_ratio > 1 and stats.layers_kept_whole == 0
    page = (Path(__file__).parents[1] / "docs" / "stats.md").read_text()
    assert page.endswith(stats_reference()), "regenerate the table of docs/stats.md from kvpipe.runtime.stats"
