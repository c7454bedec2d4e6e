"""Uniform allocation: every (layer, KV head) of a row keeps the same number of slots."""
from __future__ import annotations

from kvpipe.core.context import CompressionContext
from kvpipe.core.registry import Stage, register


@register("uniform", family="budget allocation")
class Uniform(Stage):
    """Allocation = the budget read per row (``keep × real tokens``, ``tokens``, or the byte equivalent)."""

    writes = ("allocation",)

    def __call__(self, ctx: CompressionContext) -> None:
        per_row = ctx.slots_per_head()
        allocation = [per_row[:, None].expand(view.valid.shape[:2]).clone() for view in ctx.layers]
        ctx.write(self, "allocation", allocation)
