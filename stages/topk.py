"""Top-k eviction: keep the best-scored slots each head is allocated; the cache then frees the rest."""
from __future__ import annotations

import torch

from kvpipe.context import CompressionContext
from kvpipe.errors import BudgetError
from kvpipe.kernels.topk import select_topk
from kvpipe.registry import Stage, register


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
            protected = protected_within(layer, candidates.protected & view.valid, k)
            keep.append(select_topk(scores, k, view.valid & candidates.eligible, protected))
        ctx.write(self, "keep", keep)


def protected_within(layer: int, protected: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``protected`` (``bool [B, H, n]``), after checking it fits in the allocation ``k [B, H]``."""
    need = protected.sum(-1)
    if bool((need > k).any()):
        raise BudgetError(
            f"layer {layer}: the budget keeps {int(k.min())} slots per head but {int(need.max())} are "
            "protected (sinks + recent window, recovered evidence); the prompt is too short for this budget. "
            "Raise the budget or protect less")
    return protected
