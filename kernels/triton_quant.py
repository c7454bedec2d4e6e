"""Triton quantize-and-pack for KIVI pages (layout 2): one program per page, bit-exact with
``kernels.pages.quantize_pages``.

Min/max ranges only (the ``kivi`` method) and float16 scales: the 16-bit rounding direction (scale up, minimum
down) is done on the bit pattern, which is what the torch reference's ``nextafter`` does.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpipe.kernels.pages import PackedPages, PageFormat


@triton.jit
def _round_up_f16(v):
    """fp32 → fp16 bits, never below ``v`` (``v`` > 0)."""
    h = v.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True)
    bits = tl.where(h.to(tl.float32) < v, bits + 1, bits)
    return bits.to(tl.float16, bitcast=True)


@triton.jit
def _round_down_f16(v):
    """fp32 → fp16, never above ``v``: one step towards -inf on the sign-magnitude bit pattern."""
    h = v.to(tl.float16)
    bits = h.to(tl.int16, bitcast=True)
    step = tl.where(bits == 0, -32767, tl.where(bits > 0, -1, 1)).to(tl.int16)   # +0 → smallest negative
    bits = tl.where(h.to(tl.float32) > v, bits + step, bits)
    return bits.to(tl.float16, bitcast=True)


@triton.jit
def _quantize(x, lo, hi, BITS: tl.constexpr):
    """Codes (int32) of fp32 ``x`` for broadcastable ranges; also the stored fp16 ``(scale, minimum)``."""
    # div_rn: compiled `/` is an approximate division on CUDA (within 2 ulp), torch's is correctly rounded; one ulp
    # is enough to move a scale across a float16 step (seen on an H200) and break bit-exactness.
    spread = hi - lo
    scale = _round_up_f16(tl.maximum(tl.div_rn(spread, tl.full(spread.shape, 2 ** BITS - 1, tl.float32)),
                                     6.103515625e-05))                                 # fp16 tiny
    minimum = _round_down_f16(lo)
    shifted = x - minimum.to(tl.float32)
    v = tl.div_rn(shifted, tl.broadcast_to(scale.to(tl.float32), shifted.shape))
    codes = tl.minimum(tl.maximum(tl.floor(v + 0.5), 0.0), 2 ** BITS - 1).to(tl.int32)
    return codes, scale, minimum


@triton.jit
def _pack_rows(codes, ROWS: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr):
    """``[ROWS, N]`` codes → ``[ROWS, N·BITS/8]`` bytes in split order (field ``j`` of byte ``k`` is code
    ``k + j·N·BITS/8``, ``kernels.quant.pack_codes``). Fields are disjoint, so a sum is an OR."""
    FIELDS: tl.constexpr = 8 // BITS
    fields = tl.reshape(codes, (ROWS, FIELDS, N // FIELDS))
    shifts = (tl.arange(0, FIELDS) * BITS)[None, :, None]
    return tl.sum(fields << shifts, axis=1).to(tl.uint8)


@triton.jit
def _quantize_page_kernel(keys, values, positions, key_codes, key_scale, key_min, value_codes, value_scale,
                          value_min, page_used, G: tl.constexpr, D: tl.constexpr, GV: tl.constexpr,
                          KBITS: tl.constexpr, VBITS: tl.constexpr):
    page = tl.program_id(0)
    tok = tl.arange(0, G)
    ch = tl.arange(0, D)
    used = tl.load(positions + page * G + tok) >= 0                                   # [G]
    tl.store(page_used + page, tl.sum(used.to(tl.int32), axis=0))
    offs = page * G * D + tok[:, None] * D + ch[None, :]
    k = tl.load(keys + offs).to(tl.float32)                                          # [G, D]
    first = tl.load(keys + page * G * D + ch).to(tl.float32)                         # slot 0 is always used
    k = tl.where(used[:, None], k, first[None, :])
    k_codes, k_scale, k_min = _quantize(k, tl.min(k, axis=0)[None, :], tl.max(k, axis=0)[None, :], KBITS)
    k_codes = tl.where(used[:, None], k_codes, 0)
    tl.store(key_scale + page * D + ch, tl.reshape(k_scale, (D,)))
    tl.store(key_min + page * D + ch, tl.reshape(k_min, (D,)))
    KEY_BYTES: tl.constexpr = D * KBITS // 8                   # bytes of one token's key codes
    k_bytes = _pack_rows(k_codes, G, D, KBITS)                                        # packed along channels
    kb = tl.arange(0, KEY_BYTES)
    tl.store(key_codes + page * G * KEY_BYTES + tok[:, None] * KEY_BYTES + kb[None, :], k_bytes)

    v = tl.reshape(tl.load(values + offs).to(tl.float32), (G, D // GV, GV))
    v_codes, v_scale, v_min = _quantize(v, tl.min(v, axis=2)[:, :, None], tl.max(v, axis=2)[:, :, None], VBITS)
    v_codes = tl.where(used[:, None], tl.reshape(v_codes, (G, D)), 0)
    VALUE_GROUPS: tl.constexpr = D // GV                       # scale/minimum pairs per token
    meta = page * G * VALUE_GROUPS + tok[:, None] * VALUE_GROUPS + tl.arange(0, VALUE_GROUPS)[None, :]
    tl.store(value_scale + meta, tl.reshape(v_scale, (G, VALUE_GROUPS)))
    tl.store(value_min + meta, tl.reshape(v_min, (G, VALUE_GROUPS)))
    VALUE_BYTES: tl.constexpr = G * VBITS // 8                 # bytes of one channel's value codes
    v_bytes = _pack_rows(tl.trans(v_codes), D, G, VBITS)                              # packed along tokens
    vb = tl.arange(0, VALUE_BYTES)
    tl.store(value_codes + page * D * VALUE_BYTES + ch[:, None] * VALUE_BYTES + vb[None, :], v_bytes)


def quantize_pages_triton(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                          fmt: PageFormat) -> PackedPages:
    """Same contract as ``kernels.pages.quantize_pages`` with min/max ranges: ``keys``/``values [P, G, D]``."""
    if fmt.scale_dtype != torch.float16:
        raise ValueError("the Triton quantize kernel stores float16 scales; use scale_dtype: float16 or backend: torch")
    pages, group, dim = keys.shape
    if dim & (dim - 1):
        raise ValueError(f"the Triton quantize kernel needs a power-of-two head dimension, got {dim}; "
                         "use backend: torch")
    keys, values, positions = keys.contiguous(), values.contiguous(), positions.to(torch.int32).contiguous()
    out = PackedPages(
        keys.new_empty(pages, group, dim * fmt.key_bits // 8, dtype=torch.uint8),
        keys.new_empty(pages, dim, dtype=torch.float16), keys.new_empty(pages, dim, dtype=torch.float16),
        keys.new_empty(pages, dim, group * fmt.value_bits // 8, dtype=torch.uint8),
        keys.new_empty(pages, group, dim // fmt.value_group, dtype=torch.float16),
        keys.new_empty(pages, group, dim // fmt.value_group, dtype=torch.float16), positions,
        keys.new_empty(pages, dtype=torch.int32))
    if pages:
        _quantize_page_kernel[(pages,)](keys, values, positions, out.key_codes, out.key_scale, out.key_min,
                                        out.value_codes, out.value_scale, out.value_min, out.used, group, dim,
                                        fmt.value_group, fmt.key_bits, fmt.value_bits)
    return out
