"""Fused decode attention over packed KIVI pages, the full-precision residual and the uncompressed tail.

One query token per sequence, in the flash-decoding shape (splits of the cache, then a merge):

* stage 1, grid ``(B·Hkv, NS + 2)``: program ``(bh, s)`` holds **all query heads of KV head bh**, padded to
  ``BLOCK_H >= 16`` rows so that both products are ``tl.dot`` (tensor cores; GQA: each packed tile is read and
  unpacked once per group). Splits ``s < NS`` share out the head's pages (per-head page counts, so heads of
  different lengths after eviction just get different bounds); split ``NS`` runs over the residual, split
  ``NS + 1`` over the tail. Pages are walked in tiles of ``min(BLOCK_N, G)`` tokens. Codes are packed along
  each product's reduction axis (``kernels.pages``), so ``_unpack_rows`` turns loaded bytes into operand rows by
  joining their fields: Triton moves the packed bytes into the tensor-core operand layout (one small
  conversion), never an unpacked tile. In 16-bit dots a code becomes ``OFFSET + code`` by OR-ing it into the
  mantissa of a float (no integer-to-float conversion); the offset's share is subtracted in fp32. Key scales
  are folded into the query and value scales into the softmax weights, so the codes go to the dots as exact
  integers. Online softmax in base 2 with fp32 statistics and accumulator; each split writes its normalised
  output and log-sum-exp.
* stage 2, grid ``(B·Hq,)``: merges the splits by their log-sum-exps.

Dot operands are the query's dtype (fp16, or bf16 with the query split into two bf16 terms for the scores;
fp32 with IEEE products for fp32 queries), and always fp32 under the interpreter, whose bf16 arithmetic is wrong
(it truncates instead of rounding). Nothing dequantized is ever written to memory. The torch reference is
``kernels.attention_reference.decode_attention_reference``.

Its speed on an H200, and what bounds it (instructions per token and latency, from Nsight Compute, not the
memory bandwidth yet): docs/results.md, GPU check.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvpipe.kernels.interpreter import interpreting
from kvpipe.kernels.pages import PackedPages, PageFormat
from kvpipe.kernels.ragged import run_starts
from kvpipe.kernels.tuning import autotuned, launcher

LOG2E = 1.4426950408889634
MIN_DOT_ROWS = 16        # tl.dot's smallest M: a GQA group of fewer query heads is padded with masked rows
DENSE_N = tl.constexpr(16)    # rows per tile over the residual and the tail


@triton.jit
def _online_update(s, v, m_i, l_i, acc, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Fold scores ``s [BH, N]`` (log2 units, -inf = masked) and values ``v [N, D]`` (dot dtype) in."""
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
    return m_i, l_i, acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)


@triton.jit
def _softmax_step(s, m_i, l_i):
    """Online softmax in base 2: the tile's weights ``p``, the old state's rescale ``alpha``, the new max and sum."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _field(x, DOT: tl.constexpr, MAGIC: tl.constexpr):
    """One code field (int16, at most 8 bits) as a dot operand. ``MAGIC``: the bit pattern of the 16-bit float
    ``OFFSET`` whose unit is one step of the mantissa; OR-ing the code in gives ``OFFSET + code`` exactly, without
    an integer-to-float conversion (a quarter-rate instruction that bounded the kernel on an H200)."""
    if MAGIC:
        return (x | MAGIC).to(DOT, bitcast=True)
    return x.to(DOT)


@triton.jit
def _unpack_rows(b, BITS: tl.constexpr, DOT: tl.constexpr, MAGIC: tl.constexpr):
    """Bytes ``[R, N]`` → codes ``[R·8/BITS, N]``: row ``r·(8/BITS) + j`` is field ``j`` (LSB first) of byte row
    ``r``. The fields are joined along a new minor axis and merged into rows, so each thread keeps the codes of
    the bytes it loaded: the conversion into the tensor-core operand layout moves packed bytes, not codes."""
    R: tl.constexpr = b.shape[0]
    N: tl.constexpr = b.shape[1]
    x = b.to(tl.int16)
    if BITS == 8:
        return _field(x, DOT, MAGIC)
    elif BITS == 4:
        c = tl.join(_field(x & 15, DOT, MAGIC), _field(x >> 4, DOT, MAGIC))             # [R, N, 2]
        return tl.reshape(tl.permute(c, (0, 2, 1)), (2 * R, N))
    else:
        lo = tl.join(_field(x & 3, DOT, MAGIC), _field((x >> 2) & 3, DOT, MAGIC))
        hi = tl.join(_field((x >> 4) & 3, DOT, MAGIC), _field(x >> 6, DOT, MAGIC))
        return tl.reshape(tl.permute(tl.join(lo, hi), (0, 3, 2, 1)), (4 * R, N))        # [R, 2(hi), 2(j), N]


@triton.jit
def _dense_rows(q, keys, values, start, n, m_i, l_i, acc, D: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Attend over ``n`` unquantized rows ``keys``/``values [*, D]`` starting at row ``start``."""
    ch = tl.arange(0, D)
    for n0 in range(0, n, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        inside = rows < n
        offs = (start + rows).to(tl.int64)[:, None] * D + ch[None, :]
        k = tl.load(keys + offs, mask=inside[:, None], other=0.0).to(DOT)
        v = tl.load(values + offs, mask=inside[:, None], other=0.0).to(DOT)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = tl.where(inside[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc, DOT, PRECISION)
    return m_i, l_i, acc


# Register caps let two 8-warp or three 4-warp programs share a multiprocessor (compiled for sm_90 without
# spills: 125 and 168 registers); the kernel is bound by latency at two programs of 4 warps (Nsight Compute).
_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s, maxnreg=r)
            for n, w, s, r in [(64, 4, 2, 168), (128, 8, 2, 128), (128, 8, 3, 128), (128, 8, 2, None),
                               (128, 4, 3, None), (64, 4, 3, 168), (64, 8, 2, None), (32, 4, 3, None)]]


@triton.jit
def _page_tile(qv, key_bytes, key_scale, key_min, value_bytes, value_scale, value_min, page_pos, pid, t0, m_i, l_i,
               acc, D: tl.constexpr, G: tl.constexpr, GV: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr,
               TILE: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr, SPLIT_Q: tl.constexpr,
               MAGIC: tl.constexpr, OFFSET: tl.constexpr):
    """Fold tokens ``t0 .. t0 + TILE`` of page ``pid`` (``t0`` relative to the page) into the online softmax."""
    ch = tl.arange(0, D)
    tok = t0 + tl.arange(0, TILE)
    # keys: bytes [D·bk/8, TILE] (packed along channels) → codes [D, TILE], exact small integers (+ OFFSET)
    KEY_BYTES: tl.constexpr = D * KBITS // 8                    # bytes of one token's key codes
    kb = tl.arange(0, KEY_BYTES)
    packed = tl.load(key_bytes + pid * (G * KEY_BYTES) + tok[None, :] * KEY_BYTES + kb[:, None])    # [bytes, TILE]
    codes = _unpack_rows(packed, KBITS, DOT, MAGIC)
    # the page's per-channel scale is folded into the query: q·k = Σ (q·s)·c + Σ q·m, minus the offset's share
    qs = qv * tl.load(key_scale + pid * D + ch).to(tl.float32)[None, :]
    hi = qs.to(DOT)
    s = tl.dot(hi, codes, input_precision=PRECISION)
    folded = hi.to(tl.float32)
    if SPLIT_Q:           # bf16: the query goes in as hi + lo, ~16 mantissa bits instead of 8 (two dots, same codes)
        lo = (qs - folded).to(DOT)
        s += tl.dot(lo, codes, input_precision=PRECISION)
        folded += lo.to(tl.float32)
    minimum = tl.load(key_min + pid * D + ch).to(tl.float32)
    s += tl.sum(qv * minimum[None, :] - OFFSET * folded, axis=1)[:, None]
    used = tl.load(page_pos + pid * G + tok) >= 0
    p, alpha, m_i, l_i = _softmax_step(tl.where(used[None, :], s, float("-inf")), m_i, l_i)
    acc = acc * alpha[:, None]
    # values: bytes [TILE·bv/8, D] (packed along tokens) → codes [TILE, D]; a token's scale is folded into its
    # weight, p·v = Σ (p·s)·c + Σ p·m; groups of GV < D channels get one masked product each
    VALUE_BYTES: tl.constexpr = G * VBITS // 8                  # bytes of one channel's value codes in a page
    vb = t0 * VBITS // 8 + tl.arange(0, TILE * VBITS // 8)
    packed = tl.load(value_bytes + pid * (D * VALUE_BYTES) + ch[None, :] * VALUE_BYTES + vb[:, None])  # [bytes, D]
    codes = _unpack_rows(packed, VBITS, DOT, MAGIC)
    VALUE_GROUPS: tl.constexpr = D // GV                        # scale/minimum pairs per token
    for g in tl.static_range(VALUE_GROUPS):
        meta = (pid * G + tok) * VALUE_GROUPS + g
        pv = (p * tl.load(value_scale + meta).to(tl.float32)[None, :]).to(DOT)
        shift = tl.sum(p * tl.load(value_min + meta).to(tl.float32)[None, :] - OFFSET * pv.to(tl.float32), axis=1)
        if VALUE_GROUPS == 1:
            acc += tl.dot(pv, codes, input_precision=PRECISION) + shift[:, None]
        else:
            inside = (ch // GV == g)[None, :]
            acc += tl.dot(pv, tl.where(inside, codes, tl.zeros_like(codes)), input_precision=PRECISION)
            acc += tl.where(inside, shift[:, None], 0.0)
    return m_i, l_i, acc


# tail_len grows by one every decode step: specialising on it (==1, %16) would recompile and re-tune the kernel
# mid-generation (seen on an H200: seconds at the 16th token).
# work_class (pages per program, a power of two) is only a tuning key: short and long caches tune apart.
@autotuned(_CONFIGS, key=["GROUP", "D", "G", "GV", "KBITS", "VBITS", "work_class"])
@triton.jit(do_not_specialize=["tail_len"])
def _decode_split_kernel(q, key_bytes, key_scale, key_min, value_bytes, value_scale, value_min, page_pos,
                         page_start, page_count, res_keys, res_values, res_start, res_len,
                         tail_keys, tail_values, tail_len, mid_o, mid_lse, qk_scale, work_class,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                         GV: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, NS: tl.constexpr,
                         DOT: tl.constexpr, PRECISION: tl.constexpr, SPLIT_Q: tl.constexpr,
                         MAGIC: tl.constexpr, OFFSET: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    heads = tl.arange(0, BLOCK_H)
    live = heads < GROUP
    ch = tl.arange(0, D)
    rows = bh * GROUP + heads
    qv = tl.load(q + rows[:, None] * D + ch[None, :], mask=live[:, None], other=0.0).to(tl.float32) * qk_scale
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    if split < NS:
        TILE: tl.constexpr = BLOCK_N if BLOCK_N < G else G          # a tile never straddles two pages
        count = tl.load(page_count + bh)
        first = tl.load(page_start + bh).to(tl.int64)
        per_split = tl.cdiv(count, NS)
        lo = tl.minimum(split * per_split, count)
        hi = tl.minimum(lo + per_split, count)
        for t0 in range(lo * G, hi * G, TILE):
            m_i, l_i, acc = _page_tile(qv, key_bytes, key_scale, key_min, value_bytes, value_scale, value_min,
                                       page_pos, first + t0 // G, t0 % G, m_i, l_i, acc, D, G, GV, KBITS, VBITS,
                                       TILE, DOT, PRECISION, SPLIT_Q, MAGIC, OFFSET)
    # the exact rows (residual, tail) are short; a narrow tile keeps them from setting the kernel's register count
    # (with BLOCK_N-wide tiles the kernel spilled at 255 registers, compiled for sm_90)
    elif split == NS:
        m_i, l_i, acc = _dense_rows(qv.to(DOT), res_keys, res_values, tl.load(res_start + bh), tl.load(res_len + bh),
                                    m_i, l_i, acc, D, DENSE_N, DOT, PRECISION)
    else:
        m_i, l_i, acc = _dense_rows(qv.to(DOT), tail_keys, tail_values, bh * tail_len, tail_len, m_i, l_i, acc, D,
                                    DENSE_N, DOT, PRECISION)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    slot = rows * (NS + 2) + split
    tl.store(mid_o + slot[:, None] * D + ch[None, :], out, mask=live[:, None])
    tl.store(mid_lse + slot, lse, mask=live)


@triton.jit
def _merge_kernel(mid_o, mid_lse, out, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, D: tl.constexpr):
    row = tl.program_id(0)
    sp = tl.arange(0, BLOCK_S)
    ch = tl.arange(0, D)
    lse = tl.load(mid_lse + row * SPLITS + sp, mask=sp < SPLITS, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    o = tl.load(mid_o + (row * SPLITS + sp)[:, None] * D + ch[None, :], mask=(sp < SPLITS)[:, None], other=0.0)
    total = tl.sum(weight, axis=0)
    merged = tl.sum(weight[:, None] * o, axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out + row * D + ch, merged.to(out.dtype.element_ty))


_launch_split = launcher(_decode_split_kernel)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(pages: int, heads: int, device: torch.device) -> int:
    """Page splits per head: about 8 programs per multiprocessor, at most 128 and at most one split per page.
    On an H200 (docs/results.md) counts from 16 to 128 were within run-to-run noise of each other at 32k-128k
    tokens; fewer programs than multiprocessors leave the GPU idle. From shapes only: no host synchronisation."""
    units = multiprocessors(device) if device.type == "cuda" else 4
    wanted = triton.cdiv(8 * units, max(heads, 1))
    return max(1, min(128, wanted, pages // max(heads, 1)))


# 16-bit floats whose mantissa step is 1: OFFSET + code is exact for codes below OFFSET (bf16 128: 7 bits, fp16
# 1024: 10 bits); the kernel subtracts OFFSET's share in fp32.
_MAGIC = {tl.bfloat16: (0x4300, 128.0), tl.float16: (0x6400, 1024.0)}


def code_offsets(dot, fmt: PageFormat) -> dict:
    """The kernel's ``MAGIC`` bit pattern and its ``OFFSET``, shared by keys and values (0: plain integer
    conversion)."""
    magic, offset = _MAGIC.get(dot, (0, 0.0))
    fits = [bits < 8 or offset > 255 for bits in (fmt.key_bits, fmt.value_bits)]
    if magic and not all(fits):
        magic, offset = 0, 0.0        # 8-bit codes in bf16: plain conversion for both sides
    return {"MAGIC": magic, "OFFSET": offset}


def dot_dtype(dtype: torch.dtype):
    """The dot operands' Triton dtype and fp32 product precision for queries of ``dtype``."""
    if interpreting() or dtype == torch.float32:
        return tl.float32, "ieee"
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "tf32"   # ignored for 16-bit operands


@dataclass(frozen=True)
class DecodeOperands:
    """What the split kernel reads of one quantized store, in its argument order, prepared once per store: a
    store never changes once built, and a decode step calls the kernel once per layer, so host time per call is
    decode time (``decode_operands``)."""

    tensors: tuple[torch.Tensor, ...]   # codes (bytes), scales, minima, positions, page starts/counts, residual
    fmt: PageFormat
    heads: int                          # B·Hkv
    pages: int


def decode_operands(pages: PackedPages, page_counts: torch.Tensor, fmt: PageFormat, residual_keys: torch.Tensor,
                    residual_values: torch.Tensor, residual_lengths: torch.Tensor) -> DecodeOperands:
    """Args: the packed pages (flat, per head in (row, head) order) and their counts ``int32 [B, Hkv]``; the
    residual ``residual_keys``/``residual_values [N, D]`` ragged per head, ``residual_lengths int32 [B, Hkv]``."""
    tensors = (pages.key_codes.view(torch.uint8), pages.key_scale, pages.key_min, pages.value_codes.view(torch.uint8),
               pages.value_scale, pages.value_min, pages.positions, run_starts(page_counts),
               page_counts.flatten().to(torch.int32).contiguous(), residual_keys.contiguous(),
               residual_values.contiguous(), run_starts(residual_lengths),
               residual_lengths.flatten().to(torch.int32).contiguous())
    return DecodeOperands(tensors, fmt, page_counts.numel(), pages.count)


def fused_decode_attention(query: torch.Tensor, store: DecodeOperands, tail_keys: torch.Tensor,
                           tail_values: torch.Tensor, scaling: float, splits: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over a quantized layer.

    Args:
        query: ``[B, Hq, 1, D]`` in fp16, bf16 or fp32 (D a power of two, 16 to 256).
        store: the quantized store's pages and residual (``decode_operands``).
        tail_keys, tail_values: ``[B, Hkv, T, D]`` (T may be 0).
        splits: page splits per head (default: ``default_splits``).
    Returns:
        ``[B, 1, Hq, D]`` in the query's dtype (the layout HF attention functions return).
    """
    batch, q_heads, q_len, dim = query.shape
    fmt, heads = store.fmt, store.heads
    if q_len != 1:
        raise ValueError(f"fused decode attention takes one query token per sequence, got {q_len}")
    if dim & (dim - 1) or not 16 <= dim <= 256 or fmt.group & (fmt.group - 1) or fmt.group < 16:
        raise ValueError(f"fused decode attention needs a power-of-two head dim in [16, 256] and page size >= 16, "
                         f"got {dim} and {fmt.group}; use backend: torch")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fused decode attention takes fp16, bf16 or fp32 queries, got {query.dtype}")
    group = batch * q_heads // heads
    if splits is None:
        splits = default_splits(store.pages, heads, query.device)
    q = query.reshape(batch * q_heads, dim).contiguous()
    mid_o = q.new_empty(batch * q_heads, splits + 2, dim, dtype=torch.float32)
    mid_lse = q.new_empty(batch * q_heads, splits + 2, dtype=torch.float32)
    dot, precision = dot_dtype(query.dtype)
    work = triton.next_power_of_2(max(1, store.pages // (heads * splits)))
    _launch_split((heads, splits + 2), (group, dim, fmt, query.dtype, work),
        q, *store.tensors, tail_keys.contiguous(), tail_values.contiguous(), tail_keys.shape[2], mid_o, mid_lse,
        scaling * LOG2E, work,
        GROUP=group, BLOCK_H=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), D=dim, G=fmt.group,
        GV=fmt.value_group, KBITS=fmt.key_bits, VBITS=fmt.value_bits, NS=splits, DOT=dot, PRECISION=precision,
        SPLIT_Q=dot == tl.bfloat16, **code_offsets(dot, fmt))
    # The interpreter truncates fp32 -> bf16 instead of rounding to nearest: there the last cast is torch's.
    out = torch.empty_like(q, dtype=torch.float32 if interpreting() else q.dtype)
    _merge_kernel[(batch * q_heads,)](mid_o, mid_lse, out, SPLITS=splits + 2,
                                      BLOCK_S=triton.next_power_of_2(splits + 2), D=dim)
    return out.to(q.dtype).view(batch, q_heads, 1, dim).transpose(1, 2)


__all__ = ["DecodeOperands", "decode_operands", "default_splits", "fused_decode_attention"]
