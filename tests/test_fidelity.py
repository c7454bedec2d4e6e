"""Fidelity metrics: zero for a no-op pipeline, positive once tokens are evicted."""
from __future__ import annotations

import kvpipe
from kvpipe.eval.fidelity import fidelity


def test_noop_has_zero_kl_and_eviction_does_not(tiny, random_ids):
    ids = random_ids(1, 120)
    context, continuation = ids[:, :90], ids[:, 90:]
    same = fidelity(tiny, kvpipe.build("noop"), context, continuation)
    assert same.kl == 0.0 and same.ppl == same.ppl_full
    pipeline = kvpipe.build({"version": 1, "budget": {"keep": 0.3}, "stages": [
        {"stage": "sinks_window", "params": {"sinks": 2, "window": 4}}, "random", "uniform", "topk"]})
    evicted = fidelity(tiny, pipeline, context, continuation)
    assert evicted.kl > 1e-4 and evicted.ppl != evicted.ppl_full
