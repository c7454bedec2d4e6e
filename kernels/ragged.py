"""Ragged per-(row, KV head) storage: pack kept slots tightly, pad them back only transiently.

The flat layout is row-major over ``(b, h, slot)``: all kept slots of (0, 0), then (0, 1), ...
Slots keep their order inside each head, so positions stay increasing.
"""
from __future__ import annotations

import torch


def pack_ragged(padded: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Select kept slots into one flat tensor.

    Args:
        padded: ``[B, H, L, *rest]``.
        keep: ``bool [B, H, L]``.
    Returns:
        ``[N, *rest]`` with ``N = keep.sum()``, a fresh tensor (owns exactly its own storage).
    """
    return padded[keep]


def run_starts(lengths: torch.Tensor) -> torch.Tensor:
    """``int32 [B·H]``: where each head's run begins in the flat layout (exclusive prefix sum of ``lengths``)."""
    flat = lengths.flatten().to(torch.int32)
    return (flat.cumsum(0) - flat).to(torch.int32)


def run_places(lengths: torch.Tensor, total: int,
               first_place: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each entry of a flat ragged tensor goes in a left-aligned layout: ``(run, place)``, two ``long
    [total]``, the entry's (row·H + head) and its place in that head's run (plus ``first_place [B·H]`` when
    given). ``lengths [B, H]`` sum to ``total`` (the flat tensor's length, known on the host), so nothing waits on
    the device: laid out per decode step, these cost two small kernels and no memory held between steps."""
    flat = lengths.flatten().long()
    runs = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat, output_size=total)
    places = torch.arange(total, device=flat.device) - (flat.cumsum(0) - flat)[runs]
    return runs, places if first_place is None else places + first_place[runs].long()


def unpack_ragged(flat: torch.Tensor, lengths: torch.Tensor, fill: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of ``pack_ragged`` for a left-aligned layout.

    Args:
        flat: ``[N, *rest]``, ``N = lengths.sum()``.
        lengths: ``long [B, H]``, slots of each head.
    Returns:
        ``(padded [B, H, max(lengths), *rest], valid bool [B, H, max(lengths)])``; empty slots hold ``fill``.
        When all heads are equally long ``padded`` is a view of ``flat`` (treat it as read-only).
    """
    width = int(lengths.max()) if lengths.numel() else 0
    valid = torch.arange(width, device=lengths.device) < lengths[..., None]
    if bool(valid.all()):                # every head equally long: the flat tensor already is the padded one
        return flat.view(*lengths.shape, width, *flat.shape[1:]), valid
    padded = flat.new_full((*lengths.shape, width, *flat.shape[1:]), fill)
    padded[valid] = flat
    return padded, valid


def scatter_runs(heads: tuple[int, ...], width: int,
                 parts: list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]], fill: float = 0,
                 tail: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, width (+ T), *rest]`` from rows placed by index, no host sync (unlike a boolean mask).

    Args:
        heads: ``(B, H)``.
        parts: ``((run, place), rows)`` each: ``rows [M, *rest]`` go to ``(run = row·H + head, place)``, two
            ``long [M]`` (found once per store, so laying it out per step reads nothing on the host).
        fill: what the places no part writes hold.
        tail: ``[B, H, T, *rest]`` written after ``width``.
    """
    rows = parts[0][1]
    extra = tail.shape[2] if tail is not None else 0
    out = rows.new_full((*heads, width + extra, *rows.shape[1:]), fill)
    runs = out.view(heads[0] * heads[1], width + extra, *rows.shape[1:])
    for places, part in parts:
        runs[places] = part
    if tail is not None:
        out[:, :, width:] = tail
    return out


def concat_ragged(first: torch.Tensor, first_lengths: torch.Tensor,
                  second: torch.Tensor, second_lengths: torch.Tensor) -> torch.Tensor:
    """Per head, ``first``'s slots then ``second``'s: two flat ragged tensors (``[N, *rest]``) merged into one."""
    a, a_valid = unpack_ragged(first, first_lengths)
    b, b_valid = unpack_ragged(second, second_lengths)
    return pack_ragged(torch.cat([a, b], 2), torch.cat([a_valid, b_valid], 2))


def select_ragged_rows(flat: torch.Tensor, lengths: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The flat ragged tensor of rows ``index`` (``long [B']``; repeats allowed)."""
    padded, valid = unpack_ragged(flat, lengths)
    return pack_ragged(padded[index], valid[index])
