"""The compressed part of one layer: the store contract, and kept slots stored ragged, per (row, KV head)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Protocol

import torch

from kvpipe.core.quantization import POSITION_DTYPE, exact_slot_bytes
from kvpipe.kernels.ragged import concat_ragged, pack_ragged, run_places, scatter_runs

RAGGED_TAIL_SLOTS = 128      # decode steps a ragged store's static tail holds before it joins the store


class Store(Protocol):
    """What a layer's compressed part offers the cache and attention (``RaggedStore``, ``QuantizedStore``). A store
    never changes once built: every change (``append``, ``select_rows``) makes a new one."""

    kind: ClassVar[str]                  # "ragged" or "quantized": how a cache file names it
    fused_decode: ClassVar[bool]         # the fused Triton decode kernel reads it (``decode_operands``)
    @property
    def lengths(self) -> torch.Tensor:
        """``[B, Hkv]``: tokens stored per head."""

    @property
    def tail_capacity(self) -> int:
        """Slots of the static tail one-token steps fill before it joins this store (``runtime.tail``)."""

    @property
    def joins_tail_at(self) -> int | None:
        """Length at which a plain tail joins this store after a forward (``None``: it stays a tail)."""

    @property
    def width(self) -> int:
        """Padded width attention sees."""

    @property
    def all_valid(self) -> bool: ...

    @property
    def nbytes(self) -> int: ...

    def valid(self) -> torch.Tensor:
        """``bool [B, Hkv, width]``."""

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``keys, values [B, Hkv, width, D]`` and ``positions long [B, Hkv, width]`` (-1 = empty)."""

    def attend(self, tail_keys: torch.Tensor, tail_values: torch.Tensor,
               workspace: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads: the padded store, then the tail ``[B, Hkv, T, D]``."""

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> Store:
        """This store with tokens ``keys``/``values [B, Hkv, T, D]`` at ``positions long [B, Hkv, T]`` added."""

    def select_rows(self, index: torch.Tensor) -> Store: ...


def storage_bytes(*tensors: torch.Tensor) -> int:
    """Bytes the tensors' storages really occupy (a view counts its whole storage)."""
    return sum(t.untyped_storage().nbytes() for t in tensors)


class ValidSlots:
    """The validity mask both stores share. A store never changes once built (every change makes a new one),
    so the mask is computed once and every decode step reuses it."""

    def _build_valid(self) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def valid(self) -> torch.Tensor:
        """``bool [B, Hkv, width]``: which padded slots hold a token (read-only)."""
        return self._valid

    @cached_property
    def _valid(self) -> torch.Tensor:
        return self._build_valid()

    @property
    def all_valid(self) -> bool:
        """Whether every padded slot holds a token: attention then needs no per-head mask."""
        return self._all_valid

    @cached_property
    def _all_valid(self) -> bool:
        return bool(self._valid.all())


@dataclass
class RaggedStore(ValidSlots):
    """Kept slots packed tightly: no head is padded to the longest one.

    ``keys``/``values [N, D]``, ``positions int32 [N]`` (logical token index of each slot), ``lengths
    int32 [B, Hkv]``; layout row-major over (row, head, slot), slots in increasing position.
    """

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    lengths: torch.Tensor

    kind: ClassVar[str] = "ragged"
    fused_decode: ClassVar[bool] = False
    tail_capacity: ClassVar[int] = RAGGED_TAIL_SLOTS
    joins_tail_at: ClassVar[int | None] = None          # a plain tail stays a tail until the next compression

    @classmethod
    def from_padded(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                    keep: torch.Tensor, pack=pack_ragged) -> RaggedStore:
        """Pack the ``keep [B, Hkv, n]`` slots of padded ``keys``/``values [B, Hkv, n, D]`` with ``pack``
        (``pack_ragged`` or a kernel with its contract)."""
        return cls(pack(keys, keep), pack(values, keep),
                   pack(positions.to(POSITION_DTYPE), keep), keep.sum(-1).to(POSITION_DTYPE))

    @cached_property                 # a store never changes once built: one host sync, not one per step
    def width(self) -> int:
        """Length of the longest head: the padded width attention sees."""
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def _build_valid(self) -> torch.Tensor:
        return torch.arange(self.width, device=self.lengths.device) < self.lengths[..., None]

    def _slots(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``long [N]`` twice: each stored slot's (row·Hkv + head) and its place in that head's padded run, worked
        out once per layout (from the lengths; no host sync), not held: 16 bytes a slot kept alive would cost 6 % of
        a bf16 slot of 64 channels. ``None`` when every head is equally long: the flat tensors are the layout."""
        return None if self.all_valid else run_places(self.lengths, self.keys.shape[0])

    def _laid_out(self, flat: torch.Tensor, slots: tuple[torch.Tensor, torch.Tensor] | None, fill: float = 0,
                  tail: torch.Tensor | None = None) -> torch.Tensor:
        """``flat [N, *rest]`` -> ``[B, Hkv, width (+ T), *rest]``: each head's slots left-aligned at ``slots``
        (``_slots()``), ``fill`` after them, then ``tail [B, Hkv, T, *rest]`` if given."""
        if slots is None:
            padded = flat.view(*self.lengths.shape, self.width, *flat.shape[1:])
            return padded if tail is None else torch.cat([padded, tail], dim=2)
        return scatter_runs(self.lengths.shape, self.width, [(slots, flat)], fill, tail)

    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transient ``keys, values [B, Hkv, width, D]`` and ``positions long [B, Hkv, width]`` (-1 = empty)."""
        slots = self._slots()
        return (self._laid_out(self.keys, slots), self._laid_out(self.values, slots),
                self._laid_out(self.positions.long(), slots, fill=-1))

    def attend(self, tail_keys: torch.Tensor, tail_values: torch.Tensor,
               workspace: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads: the padded store, then the tail, ``[B, Hkv, width + T, D]`` (no host sync; a
        ragged store needs no dequantization workspace)."""
        slots = self._slots()
        return self._laid_out(self.keys, slots, tail=tail_keys), self._laid_out(self.values, slots, tail=tail_values)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> RaggedStore:
        """Tokens ``keys``/``values [B, Hkv, T, D]`` at ``positions long [B, Hkv, T]`` (all real) after each head's
        slots: a full static tail joining the store (eager, once per ``tail_capacity`` steps)."""
        dim = keys.shape[-1]
        added = torch.full_like(self.lengths, keys.shape[2])
        return RaggedStore(concat_ragged(self.keys, self.lengths, keys.reshape(-1, dim), added),
                           concat_ragged(self.values, self.lengths, values.reshape(-1, dim), added),
                           concat_ragged(self.positions, self.lengths, positions.reshape(-1).to(POSITION_DTYPE),
                                         added), self.lengths + added)

    def select_rows(self, index: torch.Tensor) -> RaggedStore:
        """Rows ``index`` (beam reorder, batch selection, repeat): ``index long [B']``."""
        keys, values, positions = self.padded()
        return RaggedStore.from_padded(keys[index], values[index], positions[index], self.valid()[index])

    @cached_property                 # read after every forward (the cache's peak); a store never changes
    def nbytes(self) -> int:
        """Bytes of the storage these tensors really hold."""
        return storage_bytes(self.keys, self.values, self.positions, self.lengths)

    @staticmethod
    def slot_bytes(head_dim: int, dtype: torch.dtype) -> int:
        """Bytes one kept slot costs: its key, its value and its position."""
        return exact_slot_bytes(head_dim, dtype)
