"""Top-k eviction: keep the best-scored slots each head is allocated; the cache then frees the rest."""
from __future__ import annotations

from kvpipe.core.registry import register
from kvpipe.core.stage_bases import EvictionStage
from kvpipe.kernels.topk import select_topk


@register("topk", family="eviction")
class TopK(EvictionStage):
    """Per head, keep the protected candidates plus the highest-scoring eligible slots up to the allocation."""

    def select(self, scores, k, eligible, protected):
        return select_topk(scores, k, eligible, protected)
