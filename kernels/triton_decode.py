"""Fused decode attention over packed pages (layout 2), the full-precision residual and the uncompressed tail.

One query token per sequence, one launch per layer, grid ``(B·Hkv, splits + 2)``. Program ``(bh, s)`` holds
**all query heads of KV head bh** (``BLOCK_H`` = the GQA group, rounded up to a power of two: ``tl.dot`` pads
small M inside the MMA), so every packed byte is read and unpacked once per group.

* Splits ``s < splits`` share out the head's pages (per-head page counts: heads of different lengths after
  eviction get different bounds) and walk them **one page per iteration**. A page's bytes unpack in registers
  into dot operands (``kernels.triton_unpack``: on a GPU a byte permute and masked ORs against the fp16 pattern
  ``0x6400`` turn 4 bytes into 8 exact fp16 numbers ``1024 + 2^(bits·j)·code``). The layout's split order makes each
  field a contiguous slice of the reduction axis, so field ``j`` of the key bytes meets slice ``j`` of the query
  and field ``j`` of the value bytes meets chunk ``j`` of the page's softmax weights, with no interleave. The
  page's key scales (and ``2^-(bits·j)``) are folded into the query once per page, the value scales into the
  weights; the offset's share and the minima are added in fp32. Empty slots are masked by the page's ``used``
  count.
* Split ``splits`` runs over the residual, split ``splits + 1`` over the tail (exact rows, in the model's dtype).
* Each program writes its normalised output and log-sum-exp (base 2), then arrives at a per-(batch, KV head)
  counter; the last to arrive merges the partials into the output and resets the counter to 0, so the next
  launch (or a CUDA graph replay) finds it ready. No second launch.

Dot operands are fp16 for fp16 and bf16 queries (the codes are exact there, with more mantissa than bf16 for the
folded query; the query is rescaled by a power of two per program so no product can overflow) and fp32 with IEEE
products for fp32 queries, and always fp32 under the interpreter, whose 16-bit arithmetic is wrong; the
interpreter also cannot run inline PTX, so there the unpack takes plain integer operations to the same numbers
(``ASM``). Nothing dequantized is ever written to memory. The torch reference is
``kernels.attention_reference.decode_attention_reference``; ``benchmarks/compile_sm90.py --check`` holds the
page loop to its instruction budget without a GPU.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kvpipe.kernels.interpreter import interpreting
from kvpipe.kernels.pages import PackedPages, PageFormat
from kvpipe.kernels.ragged import run_starts
from kvpipe.kernels.triton_unpack import fields
from kvpipe.kernels.tuning import autotuned, launcher

LOG2E = 1.4426950408889634
DENSE_N = tl.constexpr(16)       # rows per tile over the residual and the tail


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """``a [M, K] @ b [K, N]`` in fp32; ``tl.dot`` needs K >= 16 (tiny head dims and int2 pages go below)."""
    K: tl.constexpr = a.shape[1]
    if K >= 16:
        return tl.dot(a, b, input_precision=PRECISION)
    return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)


@triton.jit
def _softmax_step(s, m_i, l_i):
    """Online softmax in base 2: the tile's weights ``p``, the old state's rescale ``alpha``, the new max and sum."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _query_slices(q, rows, live, q_unit, D: tl.constexpr, PARTS: tl.constexpr):
    """The query rows in fp32 times ``q_unit``, cut into ``PARTS`` channel slices (a tuple of ``[BLOCK_H,
    D / PARTS]``), the channels each key field covers: loaded once per program, folded with each page's scales."""
    WIDTH: tl.constexpr = D // PARTS
    base = q + rows[:, None] * D + tl.arange(0, WIDTH)[None, :]
    if PARTS == 1:
        return (tl.load(base, mask=live[:, None], other=0.0).to(tl.float32) * q_unit,)
    elif PARTS == 2:
        return (tl.load(base, mask=live[:, None], other=0.0).to(tl.float32) * q_unit,
                tl.load(base + WIDTH, mask=live[:, None], other=0.0).to(tl.float32) * q_unit)
    else:
        return (tl.load(base, mask=live[:, None], other=0.0).to(tl.float32) * q_unit,
                tl.load(base + WIDTH, mask=live[:, None], other=0.0).to(tl.float32) * q_unit,
                tl.load(base + 2 * WIDTH, mask=live[:, None], other=0.0).to(tl.float32) * q_unit,
                tl.load(base + 3 * WIDTH, mask=live[:, None], other=0.0).to(tl.float32) * q_unit)


@triton.jit
def _token_chunks(p, PARTS: tl.constexpr):
    """``p [M, N]`` → a tuple of ``PARTS`` column slices ``[M, N / PARTS]`` (slice ``j`` = columns ``j·N/PARTS ..``)."""
    M: tl.constexpr = p.shape[0]
    N: tl.constexpr = p.shape[1]
    if PARTS == 1:
        return (p,)
    elif PARTS == 2:
        return tl.split(tl.permute(tl.reshape(p, (M, 2, N // 2)), (0, 2, 1)))
    else:
        lo, hi = tl.split(tl.permute(tl.reshape(p, (M, 2, 2, N // 4)), (0, 3, 1, 2)))   # column = 2a·N/4 + b·N/4 ..
        first, third = tl.split(lo)
        second, fourth = tl.split(hi)
        return first, second, third, fourth


@triton.jit
def _page(q_slices, q_power, key_codes, key_scale, key_min, value_codes, value_scale, value_min, pid, used,
          m_i, l_i, acc, BLOCK_H: tl.constexpr, D: tl.constexpr, G: tl.constexpr, GV: tl.constexpr,
          KBITS: tl.constexpr, VBITS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
          OFFSET: tl.constexpr, ASM: tl.constexpr):
    """Fold page ``pid`` (its first ``used`` slots) into the online softmax. ``q_slices``: the query's channel
    slices for the key dots (``_query_slices``) in log2 units times the power of two ``q_power``, which the scores
    undo in fp32."""
    KEY_BYTES: tl.constexpr = D * KBITS // 8      # bytes of one token's key codes = channels per key field
    CHUNK: tl.constexpr = G * VBITS // 8          # bytes of one channel's value codes = tokens per value field
    KF: tl.constexpr = 8 // KBITS
    VF: tl.constexpr = 8 // VBITS
    VALUE_GROUPS: tl.constexpr = D // GV
    kb = tl.arange(0, KEY_BYTES)
    ch = tl.arange(0, D)
    tok = tl.arange(0, G)
    # keys: bytes [KEY_BYTES, G] (packed along channels), field i = channels i·KEY_BYTES .. (i+1)·KEY_BYTES
    keys = fields(tl.load(key_codes + pid * (G * KEY_BYTES) + tok[None, :] * KEY_BYTES + kb[:, None]), KBITS,
                   OFFSET, DOT, ASM)
    # q·k = Σ q·(scale·code + min): the page's scales (and field i's 2^-(bits·i)) folded into the query; the minima
    # and the offset's share are one sum per row, added in fp32
    s = tl.zeros([BLOCK_H, G], tl.float32)
    shift = tl.zeros([BLOCK_H, KEY_BYTES], tl.float32)
    for i in tl.static_range(KF):
        c = i * KEY_BYTES + kb
        qi = q_slices[i]
        folded = (qi * (tl.load(key_scale + pid * D + c).to(tl.float32) * (1.0 / (1 << (KBITS * i))))[None, :])
        folded = folded.to(DOT)
        s += _mm(folded, keys[i], PRECISION)
        shift += qi * tl.load(key_min + pid * D + c).to(tl.float32)[None, :] - OFFSET * folded.to(tl.float32)
    s = (s + tl.sum(shift, axis=1)[:, None]) * (1.0 / q_power)
    p, alpha, m_i, l_i = _softmax_step(tl.where((tok < used)[None, :], s, float("-inf")), m_i, l_i)
    acc = acc * alpha[:, None]
    # values: bytes [CHUNK, D] (packed along tokens), field j = tokens j·CHUNK .. (j+1)·CHUNK of the page.
    # p·v = Σ p·(scale·code + min): each token's scale (and its field's 2^-(bits·j)) folded into its weight
    values = fields(tl.load(value_codes + pid * (D * CHUNK) + ch[None, :] * CHUNK + tl.arange(0, CHUNK)[:, None]),
                     VBITS, OFFSET, DOT, ASM)
    unit = 1.0 / (1 << (VBITS * (tok // CHUNK))).to(tl.float32)                      # [G]
    for g in tl.static_range(VALUE_GROUPS):            # groups of GV < D channels: one masked product each
        meta = (pid * G + tok) * VALUE_GROUPS + g
        pv = (p * (tl.load(value_scale + meta).to(tl.float32) * unit)[None, :]).to(DOT)
        shift = tl.sum(p * tl.load(value_min + meta).to(tl.float32)[None, :] - OFFSET * pv.to(tl.float32), axis=1)
        weights = _token_chunks(pv, VF)
        for j in tl.static_range(VF):
            if VALUE_GROUPS == 1:
                acc += _mm(weights[j], values[j], PRECISION)
            else:
                inside = (ch // GV == g)[None, :]
                acc += _mm(weights[j], tl.where(inside, values[j], tl.zeros_like(values[j])), PRECISION)
        if VALUE_GROUPS == 1:
            acc += shift[:, None]
        else:
            acc += tl.where((ch // GV == g)[None, :], shift[:, None], 0.0)
    return m_i, l_i, acc


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
        s = tl.where(inside[None, :], _mm(q, tl.trans(k), PRECISION), float("-inf"))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None] + _mm(p.to(DOT), v, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _merge(partial_o, partial_lse, out, rows, live, programs, D: tl.constexpr, BLOCK_H: tl.constexpr):
    """The last program of a KV head: merge its ``programs`` partial results by their log-sum-exps into ``out``.
    Partials are read through L2 (``.cg``): other multiprocessors wrote them, and L1 is not coherent."""
    ch = tl.arange(0, D)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_H], tl.float32)
    merged = tl.zeros([BLOCK_H, D], tl.float32)
    for split in range(programs):
        slot = rows * programs + split
        lse = tl.load(partial_lse + slot, mask=live, other=float("-inf"), cache_modifier=".cg")
        o = tl.load(partial_o + slot[:, None] * D + ch[None, :], mask=live[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        weight = tl.exp2(lse - m_safe)
        merged = merged * alpha[:, None] + weight[:, None] * o
        total = total * alpha + weight
        m = m_new
    merged = merged / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(out + rows[:, None] * D + ch[None, :], merged.to(out.dtype.element_ty), mask=live[:, None])


# num_warps, num_stages, register cap: a page of int4 keys and values at head dim 128 is 16 KB of bytes per stage;
# the cap lets three 4-warp programs share a multiprocessor (compiled for sm_90 without spills).
_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s, maxnreg=r)
            for w, s, r in [(4, 2, 168), (4, 3, 168), (4, 2, None), (8, 2, 128), (8, 3, None), (2, 2, None)]]


# Split counts and tail capacities change as a decode goes on: specialising on them (==1, %16) would recompile and
# re-tune the kernel mid-generation (seen on an H200: seconds at the 16th token). The tail's length is read from
# device memory: a decode step passes the same arguments every time, as a CUDA graph replays them.
# work_class (pages per program, a power of two) is only a tuning key: short and long caches tune apart.
@autotuned(_CONFIGS, key=["GROUP", "D", "G", "GV", "KBITS", "VBITS", "work_class"])
@triton.jit(do_not_specialize=["tail_capacity", "splits"])
def _decode_kernel(q, key_codes, key_scale, key_min, value_codes, value_scale, value_min, page_used,
                   page_start, page_count, res_keys, res_values, res_start, res_len,
                   tail_keys, tail_values, tail_len, tail_capacity, partial_o, partial_lse, arrivals, out, qk_scale,
                   splits,
                   work_class, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                   GV: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, DOT: tl.constexpr,
                   DENSE: tl.constexpr, PRECISION: tl.constexpr, OFFSET: tl.constexpr, ASM: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    heads = tl.arange(0, BLOCK_H)
    live = heads < GROUP
    ch = tl.arange(0, D)
    rows = bh * GROUP + heads
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    if split < splits:
        count = tl.load(page_count + bh)
        first = tl.load(page_start + bh).to(tl.int64)
        per_split = tl.cdiv(count, splits)
        lo = tl.minimum(split * per_split, count)
        hi = tl.minimum(lo + per_split, count)
        # a power of two brings the query's largest element to [0.5, 1): no folded product can overflow fp16
        top = tl.max(tl.max(tl.abs(tl.load(q + rows[:, None] * D + ch[None, :], mask=live[:, None], other=0.0)
                                   .to(tl.float32)), axis=1), axis=0) * qk_scale
        q_power = tl.exp2(-tl.ceil(tl.log2(tl.where(top > 0, top, 1.0))))
        q_slices = _query_slices(q, rows, live, qk_scale * q_power, D, 8 // KBITS)
        for page in range(lo, hi):
            pid = first + page
            m_i, l_i, acc = _page(q_slices, q_power, key_codes, key_scale, key_min, value_codes, value_scale,
                                  value_min, pid, tl.load(page_used + pid), m_i, l_i, acc, BLOCK_H, D, G, GV, KBITS,
                                  VBITS, DOT, PRECISION, OFFSET, ASM)
    else:
        # the exact rows (residual, tail) are short; a narrow tile keeps them from setting the register count
        qd = (tl.load(q + rows[:, None] * D + ch[None, :], mask=live[:, None], other=0.0).to(tl.float32)
              * qk_scale).to(DENSE)
        if split == splits:
            m_i, l_i, acc = _dense_rows(qd, res_keys, res_values, tl.load(res_start + bh), tl.load(res_len + bh),
                                        m_i, l_i, acc, D, DENSE_N, DENSE, PRECISION)
        else:
            m_i, l_i, acc = _dense_rows(qd, tail_keys, tail_values, bh * tail_capacity, tl.load(tail_len), m_i, l_i,
                                        acc, D, DENSE_N, DENSE, PRECISION)
    empty = l_i == 0.0
    programs = splits + 2
    slot = rows * programs + split
    tl.store(partial_o + slot[:, None] * D + ch[None, :], acc / tl.where(empty, 1.0, l_i)[:, None],
             mask=live[:, None])
    tl.store(partial_lse + slot, tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i))), mask=live)
    # every thread's partial is stored before the arrival (barrier), and the arrival releases them to the program
    # that arrives last, which acquires them before merging
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals + bh, 1, sem="acq_rel")
    if arrived == programs - 1:
        _merge(partial_o, partial_lse, out, rows, live, programs, D, BLOCK_H)
        tl.atomic_xchg(arrivals + bh, 0, sem="relaxed")


_launch = launcher(_decode_kernel)


@functools.cache
def multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(pages: int, heads: int, device: torch.device) -> int:
    """Page splits per head: about 3 programs per multiprocessor (FlashAttention-2's rule), at least 4 pages per
    program, at most 128. At 32k tokens of a Llama-3.1-8B layer on 132 multiprocessors: 50 splits of 5 pages at
    batch 1, 7 at batch 8. From shapes only: no host synchronisation."""
    units = multiprocessors(device) if device.type == "cuda" else 4
    wanted = triton.cdiv(3 * units, max(heads, 1))
    return max(1, min(128, wanted, pages // (4 * max(heads, 1))))


def dot_dtypes(dtype: torch.dtype):
    """``(page dot dtype, dense dot dtype, fp32 product precision, code offset)`` for queries of ``dtype``."""
    if interpreting() or dtype == torch.float32:
        return tl.float32, tl.float32, "ieee", 0
    dense = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    return tl.float16, dense, "tf32", 1024                     # "tf32" is ignored for 16-bit operands


class DecodeWorkspace:
    """Partial outputs, log-sum-exps and arrival counters of one store's launches: allocated on the first call
    (counters zeroed once; every launch leaves them at zero) and reused while the shapes stay."""

    def __init__(self):
        self.buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def get(self, rows: int, programs: int, dim: int, heads: int, device: torch.device):
        have = self.buffers
        if have is None or have[0].shape != (rows, programs, dim) or have[2].numel() != heads \
                or have[0].device != device:
            self.buffers = (torch.empty(rows, programs, dim, dtype=torch.float32, device=device),
                            torch.empty(rows, programs, dtype=torch.float32, device=device),
                            torch.zeros(heads, dtype=torch.int32, device=device))
        return self.buffers

    def __getstate__(self) -> dict:
        return {"buffers": None}            # scratch memory, not cache: a copy grows its own


class DecodeOperands(NamedTuple):
    """What the kernel reads of one quantized store, prepared once per store (a decode step calls the kernel once
    per layer, so host time per call is decode time). Names are the kernel's argument names."""

    key_codes: torch.Tensor      # uint8 [P, G, D·bk/8]
    key_scale: torch.Tensor      # [P, D]
    key_min: torch.Tensor
    value_codes: torch.Tensor    # uint8 [P, D, G·bv/8]
    value_scale: torch.Tensor    # [P, G, D/Gv]
    value_min: torch.Tensor
    page_used: torch.Tensor      # int32 [P]
    page_start: torch.Tensor     # int32 [B·Hkv]: each head's first page
    page_count: torch.Tensor     # int32 [B·Hkv]
    res_keys: torch.Tensor       # [N, D], ragged per head
    res_values: torch.Tensor
    res_start: torch.Tensor      # int32 [B·Hkv]
    res_len: torch.Tensor        # int32 [B·Hkv]
    fmt: PageFormat
    heads: int                   # B·Hkv
    pages: int
    workspace: DecodeWorkspace

    def kernel_args(self) -> dict:
        return {name: getattr(self, name) for name in self._fields[:13]}


def decode_operands(pages: PackedPages, page_counts: torch.Tensor, fmt: PageFormat, residual_keys: torch.Tensor,
                    residual_values: torch.Tensor, residual_lengths: torch.Tensor) -> DecodeOperands:
    """Args: the packed pages (flat, per head in (row, head) order) and their counts ``int32 [B, Hkv]``; the
    residual ``residual_keys``/``residual_values [N, D]`` ragged per head, ``residual_lengths int32 [B, Hkv]``."""
    return DecodeOperands(pages.key_codes, pages.key_scale, pages.key_min, pages.value_codes, pages.value_scale,
                          pages.value_min, pages.used, run_starts(page_counts),
                          page_counts.flatten().to(torch.int32).contiguous(), residual_keys.contiguous(),
                          residual_values.contiguous(), run_starts(residual_lengths),
                          residual_lengths.flatten().to(torch.int32).contiguous(), fmt, page_counts.numel(),
                          pages.count, DecodeWorkspace())


def fused_decode_attention(query: torch.Tensor, store: DecodeOperands, tail_keys: torch.Tensor,
                           tail_values: torch.Tensor, scaling: float, splits: int | None = None,
                           tail_length: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over a quantized layer.

    Args:
        query: ``[B, Hq, 1, D]`` in fp16, bf16 or fp32 (D a power of two, 16 to 256).
        store: the quantized store's pages and residual (``decode_operands``).
        tail_keys, tail_values: ``[B, Hkv, T, D]`` (T may be 0).
        splits: page splits per head (default: ``default_splits``).
        tail_length: ``int64 [1]`` on the device: how many of the tail's T slots hold tokens (a static tail that
            decode steps fill in place, ``runtime.tail``); default: all T.
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
    partial_o, partial_lse, arrivals = store.workspace.get(batch * q_heads, splits + 2, dim, heads, query.device)
    # The interpreter truncates fp32 -> bf16 instead of rounding to nearest: there the last cast is torch's.
    out = torch.empty_like(q, dtype=torch.float32 if interpreting() else q.dtype)
    if tail_length is None:
        tail_length = torch.full((1,), tail_keys.shape[2], dtype=torch.int64, device=query.device)
    dot, dense, precision, offset = dot_dtypes(query.dtype)
    work = triton.next_power_of_2(max(1, store.pages // (heads * splits)))
    _launch((heads, splits + 2), (group, dim, fmt, query.dtype, work),
            q=q, **store.kernel_args(), tail_keys=tail_keys.contiguous(), tail_values=tail_values.contiguous(),
            tail_len=tail_length, tail_capacity=tail_keys.shape[2], partial_o=partial_o, partial_lse=partial_lse,
            arrivals=arrivals, out=out,
            qk_scale=scaling * LOG2E, splits=splits, work_class=work, GROUP=group,
            BLOCK_H=triton.next_power_of_2(group), D=dim, G=fmt.group, GV=fmt.value_group, KBITS=fmt.key_bits,
            VBITS=fmt.value_bits, DOT=dot, DENSE=dense, PRECISION=precision, OFFSET=offset, ASM=not interpreting())
    return out.to(q.dtype).view(batch, q_heads, 1, dim).transpose(1, 2)


__all__ = ["DecodeOperands", "DecodeWorkspace", "decode_operands", "default_splits", "fused_decode_attention"]
