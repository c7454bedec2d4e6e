"""Top-k eviction: keep the best-scored slots each head is allocated; the cache then frees the rest."""
from __future__ import annotations

import torch

from kvpipe.core.context import CompressionContext
from kvpipe.core.registry import Stage, register
from kvpipe.kernels.topk import select_topk


@register("topk", family="eviction")
class TopK(Stage):
    """Per head, keep the protected candidates plus the highest-scoring eligible slots up to the allocation."""

    reads = ("scores", "allocation")
    optional_reads = ("candidates",)
    writes = ("keep",)

    def __call__(self, ctx: CompressionContext) -> None:
        keep = []
        for layer, (view, scores, k, candidates) in enumerate(
                zip(ctx.layers, ctx.read(self, "scores"), ctx.read(self, "allocation"), ctx.candidates(self))):
            protected = candidates.protected & view.valid
            k = within_budget(ctx, layer, protected, k)
            keep.append(select_topk(scores, k, view.valid & candidates.eligible, protected))
        ctx.write(self, "keep", keep)


def within_budget(ctx: CompressionContext, layer: int, protected: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The allocation ``k [B, H]``, raised where a head's ``protected`` slots (``bool [B, H, n]``) exceed it: a
    prompt shorter than the protected window keeps them all (``ctx.over_budget`` reports or, strict, refuses)."""
    need = protected.sum(-1)
    short = (need - k).clamp_min(0)
    if bool((short > 0).any()):
        ctx.over_budget(f"layer {layer}: the budget keeps {int(k.min())} slots per head but {int(need.max())} are "
                        "protected (sinks + recent window, recovered evidence); the prompt is too short for this "
                        "budget. Raise the budget or protect less", int(short.sum()))
    return torch.maximum(k, need)
