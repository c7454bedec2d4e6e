"""Per-head top-k selection with a variable k per (row, head): the eviction primitive (torch reference)."""
from __future__ import annotations

import torch


def select_topk(scores: torch.Tensor, k: torch.Tensor, valid: torch.Tensor,
                protected: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``k`` best valid slots of each head, protected slots first.

    Args:
        scores: ``float [B, H, n]``, higher = keep.
        k: ``long [B, H]``, slots to keep per head (clipped to the valid count).
        valid: ``bool [B, H, n]``; invalid slots are never kept.
        protected: ``bool [B, H, n]`` or None; always kept (callers check they fit in ``k``).
    Returns:
        ``bool [B, H, n]`` with exactly ``min(k, valid.sum(-1))`` True per head. Ties go to the earlier slot.
    """
    return (ranks(keep_order(scores, valid, protected)) < k[..., None]) & valid


def keep_order(scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor | None) -> torch.Tensor:
    """Scores as float with protected slots first (+inf) and invalid slots last (-inf). NaN scores rank after
    every real score (a descending sort would put them first) and infinite ones next to the largest finite:
    protected slots stay first whatever a scorer returns."""
    finfo = torch.finfo(torch.float32)
    ordered = scores.float().nan_to_num(nan=finfo.min, posinf=finfo.max, neginf=finfo.min)
    ordered = ordered.masked_fill(~valid, float("-inf"))
    return ordered if protected is None else ordered.masked_fill(protected & valid, float("inf"))


def ranks(values: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """``long``, same shape: each entry's place in a stable sort along the last dimension (0 = first)."""
    order = torch.argsort(values, dim=-1, descending=descending, stable=True)
    places = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, places)
