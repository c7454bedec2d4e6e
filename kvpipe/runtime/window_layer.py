"""A sliding-window layer whose older tokens are quantized: ``QuantizedWindowLayer``.

It behaves exactly like transformers' ``DynamicSlidingWindowLayer`` (same lengths returned, same mask sizes, so
transformers' sliding mask applies unchanged) except in what it holds: the newest tokens in the model's dtype
(a residual of ``residual`` to ``residual + G - 1`` tokens, KIVI's window), and older ones as packed pages of
``G`` tokens per (row, KV head) in the pipeline's page format (``kernels.pages``). Pages whose every token has
left the window are dropped, so it holds the window's ``sliding_window - 1`` tokens plus at most ``G - 1``
older ones, and at most a page's worth of them in full precision beyond the residual.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvpipe.core.quantization import Quantization
from kvpipe.kernels.pages import PackedPages
from kvpipe.runtime.quantized_store import dequantized, pack_pages
from kvpipe.runtime.rows import SelectsRows
from kvpipe.runtime.store import storage_bytes


class QuantizedWindowLayer(SelectsRows, DynamicSlidingWindowLayer):
    is_croppable = False

    def __init__(self, sliding_window: int, quant: Quantization):
        super().__init__(sliding_window=sliding_window)
        self.quant = quant
        self.pages: tuple[PackedPages, ...] = ()   # oldest first; each: one page per (row, head), B·Hkv pages

    @property
    def group(self) -> int:
        return self.quant.fmt.group

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, q, D]``; returns what ``DynamicSlidingWindowLayer`` returns: the window's previous
        ``min(seen, sliding_window - 1)`` tokens (older ones dequantized) and the new ones."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            # an empty residual of the right shape (transformers starts from a 1-D empty tensor)
            self.keys, self.values = key_states[..., :0, :].detach(), value_states[..., :0, :].detach()
        # What it holds is constants (codes are not differentiable); the new tokens keep their graph.
        with torch.no_grad():
            held_keys, held_values = self.held()
            visible = min(held_keys.shape[-2], self.sliding_window - 1)
            self.cumulative_length += key_states.shape[-2]
            self._hold(torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2))
        keys = torch.cat([held_keys[..., held_keys.shape[-2] - visible:, :], key_states], -2)
        values = torch.cat([held_values[..., held_values.shape[-2] - visible:, :], value_states], -2)
        return keys, values

    def held(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token held, oldest first, pages dequantized: ``keys``/``values [B, Hkv, n, D]``."""
        if not self.pages:
            return self.keys, self.values
        batch, heads, _, dim = self.keys.shape
        parts = [dequantized(pages, self.quant, self.keys.dtype) for pages in self.pages]
        keys = [k.view(batch, heads, self.group, dim) for k, _ in parts]
        values = [v.view(batch, heads, self.group, dim) for _, v in parts]
        return torch.cat([*keys, self.keys], -2), torch.cat([*values, self.values], -2)

    def _hold(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Keep the residual ``keys``/``values [B, Hkv, r, D]`` (the newest tokens): drop what left the window
        (whole pages, or residual tokens when no page is left), then quantize whole pages beyond ``residual``."""
        needed, group = self.sliding_window - 1, self.group
        pages = self.pages
        while pages and (len(pages) - 1) * group + keys.shape[-2] >= needed:
            pages = pages[1:]
        if not pages and keys.shape[-2] > needed:
            keys, values = keys[..., keys.shape[-2] - needed:, :], values[..., values.shape[-2] - needed:, :]
        while keys.shape[-2] - group >= self.quant.residual:
            pages = (*pages, self._pack(keys[..., :group, :], values[..., :group, :]))
            keys, values = keys[..., group:, :], values[..., group:, :]
        self.pages = pages
        # copies, not views: a view would keep the whole concatenation it was cut from alive
        self.keys, self.values = keys.clone(), values.clone()

    def _pack(self, keys: torch.Tensor, values: torch.Tensor) -> PackedPages:
        batch, heads, group, dim = keys.shape
        first = self.cumulative_length - keys.shape[-2]        # not read back: pages record positions anyway
        positions = torch.arange(first, first + group, dtype=torch.int32, device=keys.device)
        return pack_pages(self.quant, keys.reshape(-1, group, dim), values.reshape(-1, group, dim),
                          positions.expand(batch * heads, group))

    @property
    def nbytes(self) -> int:
        """Bytes this layer really holds: its pages and its residual."""
        if not self.is_initialized:
            return 0
        return storage_bytes(self.keys, self.values, *(t for pages in self.pages for t in pages.tensors()))

    # --- what transformers asks of a layer besides update (rows: ``SelectsRows``) ----------------------
    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a quantized sliding-window layer cannot be cropped: its older tokens are "
                                  "quantized")

    def reset(self) -> None:
        super().reset()
        self.pages = ()

    def _select_rows(self, index: torch.Tensor) -> None:
        batch, heads = self.keys.shape[:2]
        # page p of a chunk is (row p // heads, head p % heads): the rows' pages, in the new row order
        pages = (index[:, None] * heads + torch.arange(heads, device=index.device)).flatten()
        self.pages = tuple(chunk.map(lambda t: t[pages]) for chunk in self.pages)
        self.keys, self.values = self.keys[index], self.values[index]


def release_cut_storage(layer: DynamicSlidingWindowLayer) -> None:
    """Transformers' window layer keeps its window as a view of the forward's concatenation: after a prefill, the
    storage of the whole prompt. A copy of the window (same values) lets the rest go when more than one token is
    cut off."""
    if layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4 and layer.keys.shape[-2]:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            # a decode step leaves one token behind the window (its concatenation of window + 1): not worth a copy
            # of the window every step
            if tensor.untyped_storage().nbytes() - tensor.nbytes > tensor.nbytes // tensor.shape[-2]:
                setattr(layer, name, tensor.clone())
