"""The fp32 ground truth of decode attention over a padded, per-head-masked cache (torch only)."""
from __future__ import annotations

import torch


def decode_attention_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                               scaling: float) -> torch.Tensor:
    """fp32 ground truth: ``query [B, Hq, 1, D]`` over ``keys``/``values [B, Hkv, n, D]`` where ``valid``
    (``bool [B, Hkv, n]``); returns ``[B, 1, Hq, D]``. Heads with no valid slot give zeros."""
    group = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, 1)
    v = values.float().repeat_interleave(group, 1)
    scores = (query.float() @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~valid.repeat_interleave(group, 1)[:, :, None, :], float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return (weights @ v).transpose(1, 2).to(query.dtype)
