"""Random scores: the control every eviction method should beat."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.context import CompressionContext
from kvpipe.core.registry import Params, Stage, register


class RandomParams(Params):
    seed: int = Field(0, description="seed; layer l uses seed + l")


@register("random", family="scoring")
class RandomScore(Stage[RandomParams]):
    """Uniform random scores per slot, reproducible from ``seed``."""

    Params = RandomParams
    writes = ("scores",)

    def __call__(self, ctx: CompressionContext) -> None:
        scores = []
        for layer, view in enumerate(ctx.layers):
            # drawn on the CPU, so that a seed gives the same scores on every device
            generator = torch.Generator().manual_seed(self.params.seed + layer)
            scores.append(torch.rand(view.valid.shape, generator=generator, device="cpu").to(view.keys.device))
        ctx.write(self, "scores", scores)
