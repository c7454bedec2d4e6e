"""KIVI-quantized pages, page layout 2: ``G`` tokens of one (row, KV head), keys per channel, values per token.

A page holds ``G`` token slots; the first ``used`` of them hold tokens (empty slots have position -1 and code 0).

* keys: one group per channel across the page's ``G`` tokens, codes packed **along channels** (per token);
* values: per token, groups of ``value_group`` channels, codes packed **along tokens** (per channel).

Each side is packed along the axis its attention product sums over (``q·k`` over channels, ``p·v`` over tokens),
in bytes, in the **split order** of ``kernels.quant.pack_codes`` (the low nibble of byte ``k`` is element ``k``,
the high nibble element ``k + half``; int2 in quarters). The fused decode kernel turns 4 loaded bytes into 8
fp16 operands with a byte permute and four masked ORs, each field a contiguous half of the reduction axis,
neighbours in a tensor-core operand: no unpacked tile goes through shared memory. It masks by the per-page
``used`` count, not by per-token positions (4 bytes a token it would otherwise read). The quantization groups
(KIVI's) are unchanged by the packing. The Triton kernels read exactly these tensors; ``PackedPages`` is also
what the cache stores.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from kvpipe.kernels.quant import affine_params, dequantize_into, pack_codes, quantize_codes, unpack_codes

# (groups [..., g] in fp32, bits, scale dtype) -> stored (scale, minimum), each [..., 1]
GroupRange = Callable[[torch.Tensor, int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


def minmax_range(groups: torch.Tensor, bits: int, scale_dtype: torch.dtype):
    """KIVI's range: the group's own minimum and maximum."""
    return affine_params(groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True), bits, scale_dtype)


@dataclass(frozen=True)
class PageFormat:
    key_bits: int
    value_bits: int
    group: int              # tokens per page = the key group
    value_group: int        # channels per value group
    scale_dtype: torch.dtype

    def page_bytes(self, head_dim: int) -> int:
        """Bytes of one page: codes, scales and minima of K and V, its positions and its used-slot count."""
        meta = self.scale_dtype.itemsize * 2
        keys = head_dim * self.group * self.key_bits // 8 + head_dim * meta
        values = self.group * head_dim * self.value_bits // 8 + self.group * (head_dim // self.value_group) * meta
        return keys + values + self.group * 4 + 4


@dataclass
class PackedPages:
    """``P`` pages. Shapes: ``key_codes uint8 [P, G, D·bk/8]``, ``key_scale``/``key_min [P, D]``,
    ``value_codes uint8 [P, D, G·bv/8]``, ``value_scale``/``value_min [P, G, D/Gv]``, ``positions int32 [P, G]``,
    ``used int32 [P]`` (slots holding a token, always the first ones)."""

    key_codes: torch.Tensor
    key_scale: torch.Tensor
    key_min: torch.Tensor
    value_codes: torch.Tensor
    value_scale: torch.Tensor
    value_min: torch.Tensor
    positions: torch.Tensor
    used: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedPages:
        """The same pages with ``fn`` applied to every tensor (all are indexed by page first)."""
        return PackedPages(*(fn(t) for t in self.tensors()))

    @property
    def count(self) -> int:
        return self.positions.shape[0]


def quantize_pages(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, fmt: PageFormat,
                   group_range: GroupRange = minmax_range) -> PackedPages:
    """Quantize and pack ``keys``/``values [P, G, D]``; ``positions int32 [P, G]`` with -1 = empty slot.

    Used slots come first in every page; empty ones are filled with the page's first token before the key
    statistics are taken, so they never widen a group.
    """
    pages, group, dim = keys.shape
    used = (positions >= 0)[..., None]
    keys = torch.where(used, keys, keys[:, :1]).float().transpose(1, 2)             # [P, D, G]
    key_scale, key_min = group_range(keys, fmt.key_bits, fmt.scale_dtype)           # [P, D, 1]
    key_codes = quantize_codes(keys, key_scale, key_min, fmt.key_bits) * used.transpose(1, 2)
    values = values.float().reshape(pages, group, dim // fmt.value_group, fmt.value_group)
    value_scale, value_min = group_range(values, fmt.value_bits, fmt.scale_dtype)    # [P, G, D/Gv, 1]
    value_codes = quantize_codes(values, value_scale, value_min, fmt.value_bits).reshape(pages, group, dim) * used
    packed = PackedPages(pack_codes(key_codes.transpose(1, 2), fmt.key_bits), key_scale[..., 0], key_min[..., 0],
                         pack_codes(value_codes.transpose(1, 2), fmt.value_bits), value_scale[..., 0],
                         value_min[..., 0], positions.to(torch.int32), used[..., 0].sum(-1, dtype=torch.int32))
    return packed.map(torch.Tensor.contiguous)                 # kernels index them as dense arrays


def dequantize_pages(pages: PackedPages, fmt: PageFormat, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys, values [P, G, D]`` in ``dtype`` (empty slots hold garbage; mask them by ``used``)."""
    shape = (pages.count, fmt.group, pages.key_scale.shape[-1])
    keys = pages.key_scale.new_empty(shape, dtype=dtype)
    values = pages.key_scale.new_empty(shape, dtype=dtype)
    dequantize_pages_into(pages, fmt, keys, values)
    return keys, values


def dequantize_pages_into(pages: PackedPages, fmt: PageFormat, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Dequantize into ``keys``/``values [..., G, D]`` (any strides with a dense ``[G, D]``; leading dims flatten
    to the page count): attention buffers are filled in place, without a dequantized copy in between.

    Keys are unpacked in their stored order (token rows) and scaled in place; values are unpacked per channel and
    read transposed by the broadcast multiply-add. All arithmetic in fp32, as the kernels.
    """
    lead, (group, dim) = keys.shape[:-2], keys.shape[-2:]
    codes = unpack_codes(pages.key_codes, fmt.key_bits).view(*lead, group, dim)
    dequantize_into(codes, pages.key_scale.view(*lead, 1, dim), pages.key_min.view(*lead, 1, dim), keys)
    split = (*lead, group, dim // fmt.value_group, fmt.value_group)
    codes = unpack_codes(pages.value_codes, fmt.value_bits).view(*lead, dim, group).transpose(-1, -2).reshape(split)
    scale, minimum = pages.value_scale.view(*split[:-1], 1), pages.value_min.view(*split[:-1], 1)
    out = values.view(split)
    work = out if out.dtype == torch.float32 else torch.empty(split, dtype=torch.float32, device=out.device)
    work.copy_(codes).mul_(scale).add_(minimum)
    if work is not out:
        out.copy_(work)
