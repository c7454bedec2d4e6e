"""No shipped pipeline makes a cache larger than the full one, on any prompt length: where storing compressed
would cost more than it frees (short prompts: every token protected, or pages, scales and positions outweighing
what was evicted), the cache stays as it was and ``stats()`` says so; static decode tails reserve only what the
layer saved."""
from __future__ import annotations

from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpipe.core.shipped import names
from kvpipe.models import cache_arg

from conftest import shipped_pipeline, tiny_model

NAMES = names()


@cache
def model():
    return tiny_model()


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(1, 300), seed=st.integers(0, 2 ** 16))
def test_a_compressed_cache_is_never_larger_than_the_full_one(tmp_path, name, length, seed):
    ids = torch.randint(2, 250, (1, length), generator=torch.Generator().manual_seed(seed))
    with shipped_pipeline(name, tmp_path).attach(model()) as handle, torch.inference_mode():
        cache_ = handle.cache()
        out = model()(ids, **cache_arg(model(), cache_))
        after_prefill = handle.stats(cache_)
        for _ in range(8):
            out = model()(out.logits[:, -1:].argmax(-1), **cache_arg(model(), cache_))
        after_decode = handle.stats(cache_)
    for stats in (after_prefill, after_decode):
        assert stats["kv_bytes"] <= stats["kv_bytes_full"], (name, length, stats["kv_bytes"], stats["kv_bytes_full"])
    if after_prefill["layers_kept_whole"]:
        assert all(layer.store is None or layer.seen > length for layer in cache_.layers)
