"""Triton compaction: pack the kept slots of every (row, head) tightly (``kernels.ragged.pack_ragged``'s contract).

One program per (row, head, feature block) walks its head's slots in blocks, places kept slots at
``head start + running count + exclusive prefix sum`` and carries the count on: a stable, race-free gather
(every destination is written by exactly one program). Head starts come from one cumulative sum over the
per-head counts, which is also what sizes the output.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvpipe.kernels.ragged import run_starts


@triton.jit
def _compact_kernel(src, keep, starts, out, n, F, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    head = tl.program_id(0)
    feats = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    live = feats < F
    written = tl.load(starts + head).to(tl.int64)
    for n0 in range(0, n, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        kept = tl.load(keep + head * n + slots, mask=slots < n, other=0).to(tl.int32)
        place = written + tl.cumsum(kept, axis=0) - kept
        rows = tl.load(src + (head * n + slots)[:, None].to(tl.int64) * F + feats[None, :],
                       mask=(kept > 0)[:, None] & live[None, :])
        tl.store(out + place[:, None] * F + feats[None, :], rows, mask=(kept > 0)[:, None] & live[None, :])
        written += tl.sum(kept, axis=0)


def pack_ragged_triton(padded: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``padded [B, H, L, *rest]``, ``keep bool [B, H, L]`` → ``[N, *rest]``, kept slots in (row, head, slot) order."""
    batch, heads, length = keep.shape
    rest = padded.shape[3:]
    features = math.prod(rest)
    counts = keep.sum(-1)
    starts = run_starts(counts)
    out = padded.new_empty(int(counts.sum()), *rest)
    if out.numel():
        block_f = min(triton.next_power_of_2(features), 128)
        grid = (batch * heads, triton.cdiv(features, block_f))
        _compact_kernel[grid](padded.contiguous(), keep.contiguous().to(torch.int8), starts, out, length, features,
                              BLOCK_N=64, BLOCK_F=block_f)
    return out
