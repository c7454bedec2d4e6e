"""One budget for the whole cache: every (layer, KV head) competes, as in KVzip and DBTrimKV."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpipe.core.allocation import calibrate, pooled_counts
from kvpipe.core.context import CompressionContext
from kvpipe.core.registry import Params, Stage, register


class GlobalParams(Params):
    calibration: Literal["zscore", "rank", "none"] = Field(
        "zscore", description="how each layer's scores are made comparable with other layers' before pooling")
    floor: float = Field(0.1, ge=0, le=1, description="fraction of the uniform per-head budget every head keeps")


@register("global", family="budget allocation")
class GlobalBudget(Stage[GlobalParams]):
    """All layers and heads share one pool of ``layers × heads × per-head budget`` slots per row; each
    layer's scores are calibrated first (z-score or rank), then the best slots anywhere win."""

    Params = GlobalParams
    reads = ("scores",)
    optional_reads = ("candidates",)
    writes = ("allocation",)

    def __call__(self, ctx: CompressionContext) -> None:
        scores = ctx.read(self, "scores")
        candidates = ctx.candidates(self)
        width = max(view.valid.shape[-1] for view in ctx.layers)
        device = ctx.layers[0].valid.device            # layers may sit on several devices (device_map): pool on one
        pad = lambda x, fill: torch.nn.functional.pad(x.to(device), (0, width - x.shape[-1]), value=fill)  # noqa: E731
        pooled_scores = torch.cat([pad(calibrate(s, v.valid, self.params.calibration, ctx.shards), 0.0)
                                   for s, v in zip(scores, ctx.layers)], dim=1)
        pooled_valid = torch.cat([pad(v.valid & c.eligible, False) for v, c in zip(ctx.layers, candidates)], dim=1)
        pooled_protected = torch.cat([pad(c.protected, False) for c in candidates], dim=1)
        per_head = ctx.slots_per_head()
        total = per_head * pooled_valid.shape[1] * ctx.shards.world              # every rank's heads compete
        counts = pooled_counts(pooled_scores, pooled_valid, pooled_protected, total,
                               torch.floor(per_head * self.params.floor).long(), ctx.shards, blocks=len(ctx.layers))
        ctx.check_pooled(counts, total, "all layers")
        per_layer = counts.split([v.valid.shape[1] for v in ctx.layers], dim=1)
        ctx.write(self, "allocation", [c.to(v.valid.device) for c, v in zip(per_layer, ctx.layers)])
