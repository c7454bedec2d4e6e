"""Turning a spec budget into a number of slots per (row, layer, KV head)."""
from __future__ import annotations

import torch

from kvpipe.spec import Budget


def slots_per_head(budget: Budget, n_real: torch.Tensor, slot_bytes: int, full_slot_bytes: int) -> torch.Tensor:
    """How many slots each head of row ``b`` keeps under a uniform reading of ``budget``.

    Args:
        n_real: ``long [B]``, real (non-padding) tokens of each row.
        slot_bytes: bytes one kept slot costs in the compressed store (K, V, position).
        full_slot_bytes: bytes one slot costs in an uncompressed cache of the model's dtype (K, V).
    Returns:
        ``long [B]``, never more than ``n_real``. Floors, so the total never exceeds the budget.
    """
    if budget.kind == "keep":
        kept = torch.floor(n_real.double() * budget.keep)
    elif budget.kind == "tokens":
        kept = torch.full_like(n_real, budget.tokens, dtype=torch.float64)
    else:  # bytes: what fraction of the full cache's bytes the kept slots may occupy
        kept = torch.floor(n_real.double() * budget.bytes * full_slot_bytes / slot_bytes)
    return torch.minimum(kept.long(), n_real.long())
