"""Combine several scorers into one score: the join point of a DAG (two scorers feeding one decision)."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpipe.core.allocation import calibrate
from kvpipe.core.context import CompressionContext
from kvpipe.core.registry import Params, Stage, register


class CombineParams(Params):
    method: Literal["sum", "product", "rank"] = Field(
        "sum", description="sum: weighted sum of per-layer z-scores; product: weighted product of the raw "
                           "(non-negative) scores; rank: weighted mean of per-layer rank fractions")
    weights: list[float] | None = Field(None, description="one weight per input scorer, in YAML order; default equal")


@register("combine", family="scoring")
class Combine(Stage[CombineParams]):
    """Merges the `scores` of every nearest upstream scorer (list them in `after:`)."""

    Params = CombineParams
    reads = ("scores",)
    merges = ("scores",)
    writes = ("scores",)

    def __call__(self, ctx: CompressionContext) -> None:
        inputs = ctx.read_all(self, "scores")
        weights = self.params.weights or [1.0] * len(inputs)
        if len(weights) != len(inputs):
            raise ValueError(f"combine {self.id!r}: {len(weights)} weights for {len(inputs)} scorers "
                             f"({', '.join(self.sources['scores'])})")
        combined = []
        for layer, view in enumerate(ctx.layers):
            parts = [scores[layer].float() for scores in inputs]
            if self.params.method == "product":
                value = torch.stack([p.clamp(min=0) ** w for p, w in zip(parts, weights)]).prod(0)
            else:
                how = "zscore" if self.params.method == "sum" else "rank"
                value = torch.stack([w * calibrate(p, view.valid, how, ctx.shards)
                                     for p, w in zip(parts, weights)]).sum(0) / sum(weights)
            combined.append(value)
        ctx.write(self, "scores", combined)
