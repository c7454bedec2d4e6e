"""Turning a spec budget into a number of slots per (row, layer, KV head)."""
from __future__ import annotations

import torch

from kvpipe.core.spec import Budget


def slots_per_head(budget: Budget, n_real: torch.Tensor, slot_bytes: float, full_slot_bytes: int,
                   overhead_bytes: float = 0.0) -> torch.Tensor:
    """How many slots each head of row ``b`` keeps under a uniform reading of ``budget``.

    Args:
        n_real: ``long [B]``, real (non-padding) tokens of each row.
        slot_bytes: bytes one kept slot costs in the compressed store (K, V, position; quantized: amortised).
        full_slot_bytes: bytes one slot costs in an uncompressed cache of the model's dtype (K, V).
        overhead_bytes: bytes a head may hold beyond ``slot_bytes`` per slot (a quantized store's residual
            window and partly used page), taken off a byte budget first.
    Returns:
        ``long [B]``, never more than ``n_real``. Floors, so the total never exceeds the budget.
    """
    if budget.kind == "keep":
        kept = torch.floor(n_real.double() * budget.keep)
    elif budget.kind == "tokens":
        kept = torch.full_like(n_real, budget.tokens, dtype=torch.float64)
    else:  # bytes: what fraction of the full cache's bytes the kept slots may occupy
        allowed = n_real.double() * budget.bytes * full_slot_bytes - overhead_bytes
        kept = torch.floor(allowed.clamp_min(0) / slot_bytes)
    return torch.minimum(kept.long(), n_real.long())
