"""PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling"): lower layers keep more, upper layers less, the mean staying at the uniform budget."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.context import CompressionContext
from kvpipe.core.registry import Params, Stage, register


class PyramidParams(Params):
    beta: float = Field(20.0, gt=1, description="the top layer keeps 1/beta of the mean per-head budget")


@register("pyramid", family="budget allocation")
class Pyramid(Stage[PyramidParams]):
    """Per-layer budgets fall linearly from the first layer to the last; heads of a layer share it evenly.

    The last layer keeps ``mean / beta`` (never fewer than its protected slots), the first ``2·mean − that``
    (never more than any head holds), so the total equals the uniform budget.
    """

    Params = PyramidParams
    optional_reads = ("candidates",)
    writes = ("allocation",)

    def __call__(self, ctx: CompressionContext) -> None:
        layers = len(ctx.layers)
        mean = ctx.slots_per_head().double()                                          # [B]
        # [B] each; layers may sit on several devices (device_map): gathered on the budget's
        held = torch.stack([view.valid.sum(-1).amin(-1).to(mean.device) for view in ctx.layers]).amin(0)
        need = torch.stack([c.protected.sum(-1).amax(-1).to(mean.device) for c in ctx.candidates(self)]).amax(0)
        held, need = ctx.shards.min(held).double(), ctx.shards.max(need).double()   # over every rank's heads
        low = torch.maximum(mean / self.params.beta, need)
        high = torch.minimum(2 * mean - low, held)
        low = 2 * mean - high
        if layers == 1 or bool((low > mean).any()):
            high = low = mean                                                           # infeasible: uniform
        step = (high - low) / max(layers - 1, 1)
        allocation = []
        for layer, view in enumerate(ctx.layers):
            per_layer = torch.floor(high - layer * step).long()
            allocation.append(per_layer[:, None].expand(view.valid.shape[:2]).to(view.valid.device, copy=True))
        ctx.write(self, "allocation", allocation)
