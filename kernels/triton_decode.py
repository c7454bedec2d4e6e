"""Fused decode attention over packed KIVI pages, the full-precision residual and the uncompressed tail.

One query token per sequence. Flash-decoding shape (kernels.md §3.1):

* stage 1, grid ``(B·Hkv, NS + 2)``: program ``(bh, s)`` holds **all query heads of KV head bh** (GQA: each
  packed tile is read and unpacked once per group). Splits ``s < NS`` share out the head's pages (per-head
  page counts, so heads of different lengths after eviction just get different bounds); split ``NS`` runs
  over the residual, split ``NS + 1`` over the tail. Codes are unpacked in registers (gather-shifter);
  key scales are folded into the query (``q·k = Σ (q·s)·c + Σ q·m``), value groups dequantized per tile.
  Online softmax in base 2; each split writes its normalised output and log-sum-exp.
* stage 2, grid ``(B·Hq,)``: merges the splits by their log-sum-exps.

Nothing dequantized is ever written to memory. The torch reference is ``decode_attention_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpipe.kernels.pages import PackedPages, PageFormat

LOG2E = 1.4426950408889634


@triton.jit
def _online_update(s, v, m_i, l_i, acc):
    """Fold scores ``s [BH, N]`` (log2 units, -inf = masked) and values ``v [N, D]`` into the running state."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    return m_new, l_i, acc


@triton.jit
def _dense_rows(q, keys, values, start, n, m_i, l_i, acc, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Attend over ``n`` unquantized rows ``keys``/``values [*, D]`` starting at row ``start``."""
    ch = tl.arange(0, D)
    for n0 in range(0, n, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        inside = rows < n
        offs = (start + rows)[:, None] * D + ch[None, :]
        k = tl.load(keys + offs, mask=inside[:, None], other=0.0).to(tl.float32)
        v = tl.load(values + offs, mask=inside[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = tl.where(inside[None, :], s, float("-inf"))
        m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc)
    return m_i, l_i, acc


@triton.jit
def _decode_split_kernel(q, key_codes, key_scale, key_min, value_codes, value_scale, value_min, page_pos,
                         page_start, page_count, res_keys, res_values, res_start, res_len,
                         tail_keys, tail_values, tail_len, mid_o, mid_lse, qk_scale,
                         GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                         GV: tl.constexpr, KBITS: tl.constexpr, VBITS: tl.constexpr, NS: tl.constexpr,
                         BLOCK_N: tl.constexpr):
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
        KPER: tl.constexpr = 32 // KBITS
        VPER: tl.constexpr = 32 // VBITS
        KW: tl.constexpr = G // KPER
        VW: tl.constexpr = D // VPER
        NG: tl.constexpr = D // GV
        tok = tl.arange(0, G)
        count = tl.load(page_count + bh)
        first = tl.load(page_start + bh)
        per_split = tl.cdiv(count, NS)
        lo = split * per_split
        hi = tl.minimum(lo + per_split, count)
        for page in range(lo, hi):
            pid = (first + page).to(tl.int64)
            words = tl.load(key_codes + pid * D * KW + ch[:, None] * KW + (tok // KPER)[None, :])
            codes = ((words >> ((tok % KPER) * KBITS)[None, :]) & ((1 << KBITS) - 1)).to(tl.float32)  # [D, G]
            scale = tl.load(key_scale + pid * D + ch).to(tl.float32)
            minimum = tl.load(key_min + pid * D + ch).to(tl.float32)
            s = tl.sum((qv * scale[None, :])[:, :, None] * codes[None, :, :], axis=1) \
                + tl.sum(qv * minimum[None, :], axis=1)[:, None]                             # [BH, G]
            used = tl.load(page_pos + pid * G + tok) >= 0
            s = tl.where(used[None, :], s, float("-inf"))
            vwords = tl.load(value_codes + pid * G * VW + tok[:, None] * VW + (ch // VPER)[None, :])
            vcodes = ((vwords >> ((ch % VPER) * VBITS)[None, :]) & ((1 << VBITS) - 1)).to(tl.float32)  # [G, D]
            meta = pid * G * NG + tok[:, None] * NG + (ch // GV)[None, :]
            v = vcodes * tl.load(value_scale + meta).to(tl.float32) + tl.load(value_min + meta).to(tl.float32)
            m_i, l_i, acc = _online_update(s, v, m_i, l_i, acc)
    elif split == NS:
        m_i, l_i, acc = _dense_rows(qv, res_keys, res_values, tl.load(res_start + bh), tl.load(res_len + bh),
                                    m_i, l_i, acc, D, BLOCK_N)
    else:
        m_i, l_i, acc = _dense_rows(qv, tail_keys, tail_values, bh * tail_len, tail_len, m_i, l_i, acc, D, BLOCK_N)
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

def _exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
    flat = counts.flatten().to(torch.int32)
    return (flat.cumsum(0) - flat).to(torch.int32)

def fused_decode_attention(query: torch.Tensor, pages: PackedPages, page_counts: torch.Tensor, fmt: PageFormat,
                           residual_keys: torch.Tensor, residual_values: torch.Tensor, residual_lengths: torch.Tensor,
                           tail_keys: torch.Tensor, tail_values: torch.Tensor, scaling: float,
                           splits: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over a quantized layer.

    Args:
        query: ``[B, Hq, 1, D]``.
        pages, page_counts: the packed pages (flat, per head in (row, head) order) and ``int32 [B, Hkv]``.
        residual_keys, residual_values: ``[N, D]`` ragged per head; ``residual_lengths int32 [B, Hkv]``.
        tail_keys, tail_values: ``[B, Hkv, T, D]`` (T may be 0).
        splits: page splits per head (default: enough programs to fill a GPU, at most 64).
    Returns:
        ``[B, 1, Hq, D]`` in the query's dtype (the layout HF attention functions return).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads = page_counts.shape[1]
    if q_len != 1:
        raise ValueError(f"fused decode attention takes one query token per sequence, got {q_len}")
    if dim & (dim - 1) or fmt.group & (fmt.group - 1):
        raise ValueError(f"fused decode attention needs power-of-two head dim and group, got {dim} and {fmt.group}")
    group = q_heads // kv_heads
    if splits is None:
        per_head = max(pages.count // max(batch * kv_heads, 1), 1)
        splits = min(64, triton.next_power_of_2(max(1, min(per_head, 512 // max(batch * kv_heads, 1)))))
    q = query.reshape(batch * q_heads, dim).contiguous()
    mid_o = q.new_empty(batch * q_heads, splits + 2, dim, dtype=torch.float32)
    mid_lse = q.new_empty(batch * q_heads, splits + 2, dtype=torch.float32)
    tail_len = tail_keys.shape[2]
    _decode_split_kernel[(batch * kv_heads, splits + 2)](
        q, pages.key_codes, pages.key_scale, pages.key_min, pages.value_codes, pages.value_scale, pages.value_min,
        pages.positions, _exclusive_cumsum(page_counts), page_counts.flatten().to(torch.int32).contiguous(),
        residual_keys.contiguous(), residual_values.contiguous(), _exclusive_cumsum(residual_lengths),
        residual_lengths.flatten().to(torch.int32).contiguous(), tail_keys.contiguous(), tail_values.contiguous(),
        tail_len, mid_o, mid_lse, scaling * LOG2E,
        GROUP=group, BLOCK_H=triton.next_power_of_2(group), D=dim, G=fmt.group, GV=fmt.value_group,
        KBITS=fmt.key_bits, VBITS=fmt.value_bits, NS=splits, BLOCK_N=32)
    out = torch.empty_like(q)
    _merge_kernel[(batch * q_heads,)](mid_o, mid_lse, out, SPLITS=splits + 2,
                                      BLOCK_S=triton.next_power_of_2(splits + 2), D=dim)
    return out.view(batch, q_heads, 1, dim).transpose(1, 2)

def decode_attention_reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor,
                               scaling: float) -> torch.Tensor:
    """fp32 ground truth: ``query [B, Hq, 1, D]`` over ``keys``/``values [B, Hkv, n, D]`` where ``valid``
    (``bool [B, Hkv, n]``); returns ``[B, 1, Hq, D]``. Heads with no valid slot give zeros."""
    group = query.shape[1] // keys.shape[1]
    k = keys.float().repeat_interleave(group, 1)
    v = values.float().repeat_interleave(group, 1)
    scores = (query.float() @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~valid.repeat_interleave(group, 1)[:, :, None, :], float("-inf"))
    weights = torch.nan_to_num(scores.softmax(-1), nan=0.0)
    return (weights @ v).transpose(1, 2).to(query.dtype)

__all__ = ["decode_attention_reference", "fused_decode_attention"]
