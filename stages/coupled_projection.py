"""Coupled projection (the third step the fixed-contract diagnostic prescribes, arXiv 2605.08234):
fit the budget without splitting evidence that only works together."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import EvictionStage
from kvpipe.kernels.topk import select_topk


class CoupledProjectionParams(Params):
    block: int = Field(16, ge=1, description="tokens per coupling block: runs of this many consecutive stored "
                                             "tokens are kept or dropped as a unit (1 = plain top-k)")


@register("coupled_projection", family="eviction")
class CoupledProjection(EvictionStage[CoupledProjectionParams]):
    """Per head: protected slots first; then whole blocks by density (mean score of the block's eligible
    slots), the densest first, as long as each block fits in what is left of the allocation; the remainder
    is filled with single slots by score. A greedy block knapsack: a fact spanning a block is kept whole
    whenever it fits, where top-k would keep its best half. ``block: 1`` is exactly ``topk``."""

    Params = CoupledProjectionParams

    def select(self, scores, k, eligible, protected):
        open_ = eligible & ~protected
        blocks = whole_blocks(scores.float(), open_, k - protected.sum(-1), self.params.block)
        chosen = protected | blocks
        rest = (k - chosen.sum(-1)).clamp_min(0)
        return chosen | select_topk(scores, rest, open_ & ~blocks)


def whole_blocks(scores: torch.Tensor, open_: torch.Tensor, room: torch.Tensor, block: int) -> torch.Tensor:
    """``bool [B, H, n]``: the densest blocks of ``open_`` slots that fit in ``room [B, H]``, whole.

    Blocks are runs of ``block`` consecutive open slots (by their order in the head). Taken in order of
    density while the running size fits: a prefix of the sorted blocks, so the choice is deterministic.
    """
    if block == 1:
        return torch.zeros_like(open_)
    batch, heads, n = open_.shape
    index = ((open_.long().cumsum(-1) - 1) // block).clamp_min(0)                        # block of each slot
    blocks = n // block + 1
    size = open_.new_zeros(batch, heads, blocks, dtype=torch.long).scatter_add_(-1, index, open_.long())
    total = scores.new_zeros(batch, heads, blocks).scatter_add_(-1, index, torch.where(open_, scores, 0.0))
    density = torch.where(size > 0, total / size.clamp_min(1), float("-inf"))
    order = torch.argsort(density, dim=-1, descending=True, stable=True)
    fits = size.gather(-1, order).cumsum(-1) <= room[..., None]
    taken = torch.zeros_like(fits).scatter(-1, order, fits & (density.gather(-1, order) > float("-inf")))
    return open_ & taken.gather(-1, index)
