"""Ada-KV (Feng et al., 2024, "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation")."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.allocation import pooled_counts
from kvpipe.core.context import CompressionContext
from kvpipe.core.registry import Params, Stage, register


class AdaptiveHeadsParams(Params):
    floor: float = Field(0.2, ge=0, le=1, description="fraction of the uniform per-head budget every head keeps "
                                                      "before the rest is shared (Ada-KV's safeguard alpha)")


@register("adaptive_heads", family="budget allocation")
class AdaptiveHeads(Stage[AdaptiveHeadsParams]):
    """The heads of a layer share the layer's budget: the highest scores across its heads win, after each
    head reserves its protected slots and a floor. Scores must be comparable across heads of a layer."""

    Params = AdaptiveHeadsParams
    reads = ("scores",)
    optional_reads = ("candidates",)
    writes = ("allocation",)

    def __call__(self, ctx: CompressionContext) -> None:
        per_head = ctx.slots_per_head()
        floor = torch.floor(per_head * self.params.floor).long()
        allocation = []
        for layer, (view, scores, c) in enumerate(zip(ctx.layers, ctx.read(self, "scores"), ctx.candidates(self))):
            total = per_head * view.valid.shape[1] * ctx.shards.world            # every rank's heads of the layer
            allocation.append(pooled_counts(scores, view.valid & c.eligible, c.protected, total, floor, ctx.shards))
            ctx.check_pooled(allocation[-1], total, f"layer {layer}")
        ctx.write(self, "allocation", allocation)
