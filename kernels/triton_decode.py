"""Fused decode attention over packed KIVI pages, the full-precision residual and the uncompressed tail.

One query token per sequence. Flash-decoding shape (kernels.md §3.1):

* stage 1, grid ``(B·Hkv, NS + 2)``: program ``(bh, s)`` holds **all query heads of KV head bh**, padded to
  ``BLOCK_H >= 16`` rows so that both products are ``tl.dot`` (tensor cores; GQA: each packed tile is read and
  unpacked once per group). Splits ``s < NS`` share out the head's pages (per-head page counts, so heads of
  different lengths after eviction just get different bounds); split ``NS`` runs over the residual, split
  ``NS + 1`` over the tail. Pages are walked in tiles of ``min(BLOCK_N, G)`` tokens; codes are unpacked in
  registers. Key scales are folded into the query (the codes go to the dot as exact integers), value groups are
  dequantized with one FMA. Online softmax in base 2 with fp32 statistics and accumulator; each split writes
  its normalised output and log-sum-exp.
* stage 2, grid ``(B·Hq,)``: merges the splits by their log-sum-exps.

Dot operands are the query's dtype (fp16, or bf16 with the query split into two bf16 terms for the scores;
fp32 with IEEE products for fp32 queries), and always fp32 under the interpreter, whose bf16 arithmetic is wrong
(kernels.md §4.3). Nothing dequantized is ever written to memory. The torch reference is
``kernels.attention_reference.decode_attention_reference``.

Speed, measured on an H200 (docs/results.md): correct, but bound by shared memory, not by HBM. Nsight Compute
at 32k tokens, batch 8: DRAM 9.5 % of peak, L1/shared 79 %, 35 % of shared wavefronts excess (bank conflicts)
from the layout conversions that carry unpacked tiles into the MMA operand layout; 168 registers and 70 KB of
shared memory per program cap occupancy at 19 %.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpipe.kernels.interpreter import interpreting
from kvpipe.kernels.pages import PackedPages, PageFormat
from kvpipe.kernels.ragged import run_starts
from kvpipe.kernels.tuning import autotuned, fixed

LOG2E = 1.4426950408889634
MIN_DOT_ROWS = 16        # tl.dot's smallest M: a GQA group of fewer query heads is padded with masked rows


@triton.jit
def _online_update(s, v, m_i, l_i, acc, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Fold scores ``s [BH, N]`` (log2 units, -inf = masked) and values ``v [N, D]`` (dot dtype) in."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _scores(qs, codes, DOT: tl.constexpr, PRECISION: tl.constexpr, SPLIT_Q: tl.constexpr):
    """``qs [BH, D]`` (fp32) · ``codes [D, N]`` (exact small integers in the dot dtype). ``SPLIT_Q`` (bf16): the query
    goes in as two bf16 terms, ``hi + lo``, so it keeps ~16 mantissa bits instead of 8 (two dots, same codes)."""
    hi = qs.to(DOT)
    s = tl.dot(hi, codes, input_precision=PRECISION)
    if SPLIT_Q:
        s += tl.dot((qs - hi.to(tl.float32)).to(DOT), codes, input_precision=PRECISION)
    return s


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


_CONFIGS = [triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=s)
            for n in (64, 32, 128) for w in (4, 8) for s in (2, 3)]


# tail_len grows by one every decode step: specialising on it (==1, %16) would recompile and re-tune the kernel
# mid-generation (seen on an H200: seconds at the 16th token).
@autotuned(_CONFIGS, key=["GROUP", "D", "G", "GV", "KBITS", "VBITS"])
@triton.jit(do_not_specialize=["tail_len"])
def _decode_split_kernel(q, key_codes, key_scale, key_min, value_codes, value_scale, value_min, page_pos,
                         page_start, page_count, res_keys, res_values, res_start, res_len,
                         tail_keys, tail_values, tail_len, mid_o, mid_lse, qk_scale,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                         GV: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, NS: tl.constexpr,
                         DOT: tl.constexpr, PRECISION: tl.constexpr, SPLIT_Q: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    heads = tl.arange(0, BLOCK_H)
    live = heads < GROUP
    ch = tl.arange(0, D)
    rows = bh * GROUP + heads
    qv = tl.load(q + rows[:, None] * D + ch[None, :], mask=live[:, None], other=0.0).to(tl.float32) * qk_scale
    qd = qv.to(DOT)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    if split < NS:
        KPER: tl.constexpr = 32 // KBITS
        VPER: tl.constexpr = 32 // VBITS
        KW: tl.constexpr = G // KPER
        VW: tl.constexpr = D // VPER
        NG: tl.constexpr = D // GV
        TILE: tl.constexpr = BLOCK_N if BLOCK_N < G else G          # a tile never straddles two pages
        count = tl.load(page_count + bh)
        first = tl.load(page_start + bh).to(tl.int64)
        per_split = tl.cdiv(count, NS)
        lo = tl.minimum(split * per_split, count)
        hi = tl.minimum(lo + per_split, count)
        for t0 in range(lo * G, hi * G, TILE):
            pid = first + t0 // G
            tok = t0 % G + tl.arange(0, TILE)
            # keys, packed along tokens → codes [D, TILE]; the page's per-channel scale is folded into the query
            # (q·k = Σ (q·s)·c + Σ q·m), so the codes go to the dot as exact integers
            # Each word is loaded once and its fields shifted out into a new axis, then merged. (Loading each word
            # once per code it holds and shifting in place was 3-6x slower on an H200 at 32k-128k tokens.)
            kw = t0 % G // KPER + tl.arange(0, TILE // KPER)
            words = tl.load(key_codes + pid * (D * KW) + ch[:, None] * KW + kw[None, :])
            shifts = tl.arange(0, KPER) * KBITS
            codes = tl.reshape((words[:, :, None] >> shifts[None, None, :]) & ((1 << KBITS) - 1), (D, TILE))
            scale = tl.load(key_scale + pid * D + ch).to(tl.float32)
            minimum = tl.load(key_min + pid * D + ch).to(tl.float32)
            s = _scores(qv * scale[None, :], codes.to(DOT), DOT, PRECISION, SPLIT_Q) \
                + tl.sum(qv * minimum[None, :], axis=1)[:, None]                          # [BH, TILE]
            used = tl.load(page_pos + pid * G + tok) >= 0
            s = tl.where(used[None, :], s, float("-inf"))
            # values, packed along channels → codes [TILE, D], per-token groups of GV channels
            row = (pid * G + tok)[:, None]
            vwords = tl.load(value_codes + row * VW + tl.arange(0, VW)[None, :])
            vshifts = tl.arange(0, VPER) * VBITS
            vcodes = tl.reshape((vwords[:, :, None] >> vshifts[None, None, :]) & ((1 << VBITS) - 1), (TILE, NG, GV))
            vmeta = row * NG + tl.arange(0, NG)[None, :]
            vscale = tl.load(value_scale + vmeta).to(tl.float32)
            vmin = tl.load(value_min + vmeta).to(tl.float32)
            v = tl.reshape(vcodes.to(tl.float32) * vscale[:, :, None] + vmin[:, :, None], (TILE, D))
            m_i, l_i, acc = _online_update(s, v.to(DOT), m_i, l_i, acc, DOT, PRECISION)
    elif split == NS:
        m_i, l_i, acc = _dense_rows(qd, res_keys, res_values, tl.load(res_start + bh), tl.load(res_len + bh),
                                    m_i, l_i, acc, D, BLOCK_N, DOT, PRECISION)
    else:
        m_i, l_i, acc = _dense_rows(qd, tail_keys, tail_values, bh * tail_len, tail_len, m_i, l_i, acc, D,
                                    BLOCK_N, DOT, PRECISION)
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


def default_splits(pages: int, heads: int, device: torch.device) -> int:
    """Page splits per head: about 8 programs per multiprocessor, at most 128 and at most one split per page.
    On an H200 (docs/results.md) counts from 16 to 128 were within run-to-run noise of each other at 32k-128k
    tokens; fewer programs than multiprocessors leave the GPU idle. From shapes only: no host synchronisation."""
    units = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = triton.cdiv(8 * units, max(heads, 1))
    return max(1, min(128, wanted, pages // max(heads, 1)))


def dot_dtype(dtype: torch.dtype):
    """The dot operands' Triton dtype and fp32 product precision for queries of ``dtype``."""
    if interpreting() or dtype == torch.float32:
        return tl.float32, "ieee"
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype], "tf32"   # ignored for 16-bit operands


def fused_decode_attention(query: torch.Tensor, pages: PackedPages, page_counts: torch.Tensor, fmt: PageFormat,
                           residual_keys: torch.Tensor, residual_values: torch.Tensor, residual_lengths: torch.Tensor,
                           tail_keys: torch.Tensor, tail_values: torch.Tensor, scaling: float,
                           splits: int | None = None, page_starts: torch.Tensor | None = None,
                           residual_starts: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over a quantized layer.

    Args:
        query: ``[B, Hq, 1, D]`` in fp16, bf16 or fp32 (D a power of two, 16 to 256).
        pages, page_counts: the packed pages (flat, per head in (row, head) order) and ``int32 [B, Hkv]``.
        residual_keys, residual_values: ``[N, D]`` ragged per head; ``residual_lengths int32 [B, Hkv]``.
        tail_keys, tail_values: ``[B, Hkv, T, D]`` (T may be 0).
        splits: page splits per head (default: ``default_splits``).
        page_starts, residual_starts: ``run_starts`` of the counts, if the caller keeps them (saves launches).
    Returns:
        ``[B, 1, Hq, D]`` in the query's dtype (the layout HF attention functions return).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads = page_counts.shape[1]
    if q_len != 1:
        raise ValueError(f"fused decode attention takes one query token per sequence, got {q_len}")
    if dim & (dim - 1) or not 16 <= dim <= 256 or fmt.group & (fmt.group - 1) or fmt.group < 16:
        raise ValueError(f"fused decode attention needs a power-of-two head dim in [16, 256] and page size >= 16, "
                         f"got {dim} and {fmt.group}; use backend: torch")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"fused decode attention takes fp16, bf16 or fp32 queries, got {query.dtype}")
    group = q_heads // kv_heads
    heads = batch * kv_heads
    if splits is None:
        splits = default_splits(pages.count, heads, query.device)
    q = query.reshape(batch * q_heads, dim).contiguous()
    mid_o = q.new_empty(batch * q_heads, splits + 2, dim, dtype=torch.float32)
    mid_lse = q.new_empty(batch * q_heads, splits + 2, dtype=torch.float32)
    dot, precision = dot_dtype(query.dtype)
    _decode_split_kernel[(heads, splits + 2)](
        q, pages.key_codes, pages.key_scale, pages.key_min, pages.value_codes, pages.value_scale, pages.value_min,
        pages.positions, page_starts if page_starts is not None else run_starts(page_counts),
        page_counts.flatten().to(torch.int32).contiguous(), residual_keys.contiguous(), residual_values.contiguous(),
        residual_starts if residual_starts is not None else run_starts(residual_lengths),
        residual_lengths.flatten().to(torch.int32).contiguous(), tail_keys.contiguous(), tail_values.contiguous(),
        tail_keys.shape[2], mid_o, mid_lse, scaling * LOG2E,
        GROUP=group, BLOCK_H=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), D=dim, G=fmt.group,
        GV=fmt.value_group, KBITS=fmt.key_bits, VBITS=fmt.value_bits, NS=splits, DOT=dot, PRECISION=precision,
        SPLIT_Q=dot == tl.bfloat16, **fixed(_decode_split_kernel))
    # The interpreter truncates fp32 -> bf16 instead of rounding to nearest: there the last cast is torch's.
    out = torch.empty_like(q, dtype=torch.float32 if interpreting() else q.dtype)
    _merge_kernel[(batch * q_heads,)](mid_o, mid_lse, out, SPLITS=splits + 2,
                                      BLOCK_S=triton.next_power_of_2(splits + 2), D=dim)
    return out.to(q.dtype).view(batch, q_heads, 1, dim).transpose(1, 2)


__all__ = ["default_splits", "fused_decode_attention"]
