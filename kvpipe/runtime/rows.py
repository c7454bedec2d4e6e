"""transformers' row operations on a cache layer (beam search's reordering, batch selection and repetition), for
layers that store rows their own way: ``SelectsRows`` turns all three into one ``_select_rows(index)``."""
from __future__ import annotations

from typing import Any

import torch


class SelectsRows:
    """Mixin (before transformers' layer class) for a layer whose ``_select_rows(index long [B'])`` keeps the rows
    ``index`` of everything it holds, in that order; it is called only once the layer holds tokens, with ``index``
    on the layer's device."""

    is_initialized: bool
    keys: Any                      # [B, Hkv, n, D] once initialized (a tensor or a property giving one)

    def _select_rows(self, index: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _rows(self, index: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_rows(index.to(self.keys.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._rows(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))
