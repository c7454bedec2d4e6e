"""Shared arithmetic of budget allocators: many heads (or layers × heads) competing for one pool of slots."""
from __future__ import annotations

import torch

from kvpipe.kernels.topk import keep_order, ranks


def pooled_counts(scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor | None,
                  total: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """How many slots each unit keeps when units share ``total`` slots per row.

    Each unit first reserves its protected slots and at least ``floor`` of its best slots; the rest of the
    pool goes to the highest scores across all units. Within a unit the chosen slots are always its best,
    so a per-unit top-k with these counts selects exactly the pooled choice.

    Args:
        scores: ``float [B, U, n]``, comparable across units.
        valid: ``bool [B, U, n]``; protected: ``bool [B, U, n]`` or None.
        total, floor: ``long [B]``.
    Returns:
        ``long [B, U]``, summing to ``min(total, valid slots)`` per row; where protected slots and floors alone
        exceed ``total``, exactly those (the caller reports the shortfall: ``CompressionContext.over_budget``).
    """
    protected = (protected & valid) if protected is not None else torch.zeros_like(valid)
    ranked = keep_order(scores, valid, protected)
    rank = ranks(ranked)
    reserved = torch.maximum(protected.sum(-1), torch.minimum(floor[:, None], valid.sum(-1)))
    remaining = (total - reserved.sum(-1)).clamp_min(0)
    counts = reserved.clone()
    open_slots = valid & (rank >= reserved[..., None])
    for row in range(scores.shape[0]):
        pool = ranked[row].masked_fill(~open_slots[row], float("-inf")).flatten()
        take = int(min(remaining[row], open_slots[row].sum()))
        units = torch.topk(pool, take).indices // scores.shape[-1]
        counts[row] += torch.bincount(units, minlength=scores.shape[1])
    return counts


def calibrate(scores: torch.Tensor, valid: torch.Tensor, how: str) -> torch.Tensor:
    """Make one layer's ``[B, H, n]`` scores comparable with other layers' (per row).

    ``zscore``: subtract the mean, divide by the standard deviation of the valid slots;
    ``rank``: the fraction of valid slots scoring below; ``none``: unchanged.
    """
    if how == "none":
        return scores.float()
    flat = scores.float().flatten(1)
    mask = valid.flatten(1)
    if how == "zscore":
        count = mask.sum(-1, keepdim=True).clamp(min=1)
        mean = (flat * mask).sum(-1, keepdim=True) / count
        std = (((flat - mean) * mask) ** 2).sum(-1, keepdim=True).div(count).sqrt().clamp(min=1e-12)
        return ((flat - mean) / std).view_as(scores)
    below = ranks(flat.masked_fill(~mask, float("-inf")), descending=False) - (~mask).sum(-1, keepdim=True)
    return (below.float() / mask.sum(-1, keepdim=True).clamp(min=1)).view_as(scores)
