"""How a layer stores its kept slots when a pipeline quantizes: a configuration, and what a token costs in it.

Pure data and byte formulas, no kernels run here: a stage (``stages/quantize.py``) makes one, budgets read its
costs, and the runtime stores, packs and previews with it (``kvpipe.runtime.quantized_store``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpipe.kernels.pages import GroupRange, PageFormat, minmax_range
from kvpipe.kernels.rotation import randomized_hadamard

POSITION_DTYPE = torch.int32      # a kept slot's logical position


def exact_slot_bytes(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one slot kept as it is costs: its key, its value (``dtype``) and its position."""
    return 2 * head_dim * dtype.itemsize + POSITION_DTYPE.itemsize


@dataclass(frozen=True)
class Quantization:
    """How a layer stores its kept slots: the page format, the residual window, and the range rule."""

    fmt: PageFormat
    residual: int
    method: str = "kivi"
    group_range: GroupRange = minmax_range
    backend: str = "torch"          # which kernels pack it: the cache's backend (``runtime.page_packers``)
    rotate: str = "none"            # "hadamard": tokens stored as ``x R`` (``kernels.rotation``), turned back on read
    rotation_seed: int = 0

    def rotation(self, head_dim: int, device: torch.device) -> torch.Tensor | None:
        """``R [D, D]`` (fp32) tokens are multiplied by before quantization, or ``None`` without rotation."""
        return None if self.rotate == "none" else randomized_hadamard(head_dim, self.rotation_seed, device)

    def slot_bytes(self, head_dim: int) -> float:
        """Bytes one quantized token costs, metadata included (amortised over its page)."""
        return self.fmt.page_bytes(head_dim) / self.fmt.group

    def overhead_bytes(self, head_dim: int, dtype: torch.dtype) -> float:
        """Most a head can hold beyond ``slot_bytes`` per token: the residual kept unquantized and one partly
        used page."""
        full = exact_slot_bytes(head_dim, dtype)
        slot = self.slot_bytes(head_dim)
        return self.residual * max(full - slot, 0) + (self.fmt.group - 1) * slot
