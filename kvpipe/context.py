"""What stages see: the per-layer ``Observation`` inside attention, and the ``CompressionContext`` after it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvpipe.budget import slots_per_head
from kvpipe.spec import Budget

if TYPE_CHECKING:
    from kvpipe.registry import Stage


@dataclass
class Observation:
    """One layer's attention inputs during a compressing forward.

    Shapes: ``query [B, Hq, q, D]`` (after RoPE), ``key``/``value [B, Hkv, kv, D]`` (everything attended,
    the ``q`` new tokens last), ``query_valid [B, q]`` and ``key_valid [B, Hkv, kv]`` (False = padding).
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float
    query_valid: torch.Tensor
    key_valid: torch.Tensor

    @property
    def groups(self) -> int:
        return self.query.shape[1] // self.key.shape[1]

    def attention_probs(self, start: int, stop: int) -> torch.Tensor:
        """Softmax attention of queries ``start:stop`` over all keys, fp32, ``[B, Hq, stop-start, kv]``.

        Causal and padding masks applied; rows of padding queries are all zero.
        """
        q, kv = self.query.shape[2], self.key.shape[2]
        keys = self.key.float().repeat_interleave(self.groups, dim=1)
        logits = self.query[:, :, start:stop].float() @ keys.transpose(-1, -2) * self.scaling
        q_pos = torch.arange(start, stop, device=keys.device) + (kv - q)
        allowed = torch.arange(kv, device=keys.device)[None, :] <= q_pos[:, None]          # [w, kv]
        allowed = allowed & self.key_valid.repeat_interleave(self.groups, dim=1)[:, :, None, :]
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        live = self.query_valid[:, None, start:stop, None]
        return torch.where(live, probs.nan_to_num(0.0), 0.0)


@dataclass
class LayerView:
    """One layer's cache as stages see it: every stored slot, padded per (row, head) to ``n``.

    ``keys``/``values [B, Hkv, n, D]``; ``positions [B, Hkv, n]`` (logical token index);
    ``valid [B, Hkv, n]`` (False = padding or an empty slot of a shorter head).
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor


@dataclass
class CompressionContext:
    """Everything one compression event works on; stages read and write ``slots[kind][layer]``."""

    layers: list[LayerView]
    budget: Budget | None
    slot_bytes: int
    full_slot_bytes: int
    observed_by: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    slots: dict[str, list] = field(default_factory=dict)

    def observed(self, stage: Stage) -> list[torch.Tensor]:
        """What ``stage.observe`` returned for each layer."""
        got = self.observed_by.get(stage.id, [])
        if len(got) != len(self.layers):
            raise RuntimeError(f"stage {stage.id!r} observed {len(got)} of {len(self.layers)} layers; "
                               "was the compressing forward run through the attached model?")
        return got

    def n_real(self, layer: int = 0) -> torch.Tensor:
        """``long [B]``: valid slots per row (the same for every head before the first eviction)."""
        return self.layers[layer].valid[:, 0].sum(-1)

    def slots_per_head(self, layer: int = 0) -> torch.Tensor:
        """``long [B]``: the budget read uniformly, per row of ``layer``."""
        if self.budget is None:
            raise RuntimeError("this pipeline has no budget; add `budget:` to the spec")
        return slots_per_head(self.budget, self.n_real(layer), self.slot_bytes, self.full_slot_bytes)
