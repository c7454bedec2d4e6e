"""A static tail: the tokens a compressed layer is fed one decode step at a time, in a preallocated buffer.

A plain tail grows by concatenation, so every decode step allocates new tensors of a new shape and passes a new
length, and a CUDA graph cannot replay it. A ``StaticTail`` holds ``capacity`` slots per (row, KV head), allocated
once; a step writes its token at the slot its **device-side** length names and adds one to that length, in place:
between two flushes every step runs the same operators on the same shapes and addresses, and reads nothing back on
the host. The host keeps its own count (each forward adds a known number of tokens) to decide when to grow or flush.
Empty slots hold zeros (masked by attention; zeros, not garbage, so a masked weight of 0 times a value is 0).
"""
from __future__ import annotations

import torch

# Slots a static tail starts with: it doubles when a decode fills it (eagerly, after that step), up to the store's
# tail_capacity. Reserved memory is real memory (handle.stats() counts it): a short decode should not reserve a
# page. The steps between two growths (16, 32, 64, then whole pages) replay as one.
STATIC_TAIL_SLOTS = 16


class StaticTail:
    """``keys``/``values [B, Hkv, capacity, D]``; the first ``length`` slots hold tokens (``device_length``:
    the same count, ``int64 [1]`` on the device, for kernels and masks)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        """Start from the tail ``keys``/``values [B, Hkv, T, D]`` (``T <= capacity``)."""
        batch, heads, held, dim = keys.shape
        if held > capacity:
            raise ValueError(f"a static tail of {capacity} slots cannot start from {held} tokens")
        self.keys = keys.new_zeros(batch, heads, capacity, dim)
        self.values = values.new_zeros(batch, heads, capacity, dim)
        self.keys[:, :, :held] = keys
        self.values[:, :, :held] = values
        self.length = held
        self.device_length = torch.full((1,), held, dtype=torch.int64, device=keys.device)
        self._slots = torch.arange(capacity, device=keys.device)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    @property
    def full(self) -> bool:
        return self.length >= self.capacity

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append one token, ``keys``/``values [B, Hkv, 1, D]``, in place (no allocation, no host read)."""
        if self.full:
            raise RuntimeError("the static tail is full: the layer flushes it after the forward that fills it")
        self.append_on_device(keys, values)
        self.length += 1

    def append_on_device(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The device part of ``write``, what a captured step replays: the token goes to the slot the device-side
        length names, and that length grows by one. The host's count is ``write``'s to keep."""
        self.keys.index_copy_(2, self.device_length, keys)
        self.values.index_copy_(2, self.device_length, values)
        self.device_length += 1

    @property
    def nbytes(self) -> int:
        """Bytes the buffers hold, empty slots included."""
        return self.keys.nbytes + self.values.nbytes

    @property
    def reserved_bytes(self) -> int:
        """Bytes of the empty slots."""
        return self.nbytes * (self.capacity - self.length) // self.capacity

    def valid(self) -> torch.Tensor:
        """``bool [capacity]``: which slots hold a token, computed on the device."""
        return self._slots < self.device_length

    def filled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens held, ``[B, Hkv, length, D]`` (views of the buffers)."""
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def clear(self) -> None:
        """Empty it for the next page, keeping the buffers."""
        self.length = 0
        self.device_length.zero_()

    def select_rows(self, index: torch.Tensor) -> StaticTail:
        keys, values = self.filled()
        return StaticTail(keys[index], values[index], self.capacity)

    def grown(self, capacity: int) -> StaticTail:
        """The same tokens in buffers of ``capacity`` slots (new shapes: a captured step is captured again)."""
        keys, values = self.filled()
        return StaticTail(keys, values, capacity)

    def copy(self) -> StaticTail:
        """An independent tail holding the same tokens (a fork must not write into this one's buffers)."""
        keys, values = self.filled()
        return StaticTail(keys, values, self.capacity)
