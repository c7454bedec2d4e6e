"""Shared arithmetic of budget allocators: many heads (or layers × heads) competing for one pool of slots."""
from __future__ import annotations

import torch

from kvpipe.core.shards import LOCAL, HeadShards
from kvpipe.kernels.topk import keep_order, ranks


def pooled_counts(scores: torch.Tensor, valid: torch.Tensor, protected: torch.Tensor | None,
                  total: torch.Tensor, floor: torch.Tensor, shards: HeadShards = LOCAL,
                  blocks: int = 1) -> torch.Tensor:
    """How many slots each unit keeps when units share ``total`` slots per row.

    Each unit first reserves its protected slots and at least ``floor`` of its best slots; the rest of the
    pool goes to the highest scores across all units. Within a unit the chosen slots are always its best,
    so a per-unit top-k with these counts selects exactly the pooled choice. Scores tied at the pool's edge go
    to the units first in (block, head) order, so the result does not depend on how units are split over ranks.

    Under tensor parallelism the units are split over ``shards``: ``blocks`` blocks (layers) of this rank's
    heads each. The ranks agree on the edge score with a radix select (``kth_largest``): four all-reduces of a
    256-bin histogram per row, then one all-gather of the units' tie counts; the traffic never grows with tokens.

    Args:
        scores: ``float [B, U, n]``, comparable across units.
        valid: ``bool [B, U, n]``; protected: ``bool [B, U, n]`` or None.
        total, floor: ``long [B]``; ``total`` counts the units of every rank.
    Returns:
        ``long [B, U]``, summing (over ranks) to ``min(total, valid slots)`` per row; where protected slots and
        floors alone exceed ``total``, exactly those (the caller reports the shortfall:
        ``CompressionContext.over_budget``).
    """
    protected = (protected & valid) if protected is not None else torch.zeros_like(valid)
    ranked = keep_order(scores, valid, protected)
    reserved = torch.maximum(protected.sum(-1), torch.minimum(floor[:, None], valid.sum(-1)))
    open_slots = valid & (ranks(ranked) >= reserved[..., None])
    remaining = (total - shards.sum(reserved.sum(-1))).clamp_min(0)
    take = torch.minimum(remaining, shards.sum(open_slots.sum((1, 2))))
    keys = order_keys(ranked).masked_fill(~open_slots, -1)                      # [B, U, n]; closed: below all
    edge = kth_largest(keys.flatten(1), take, shards)                           # [B]
    above = (keys > edge[:, None, None]).sum(-1)                                # [B, U]
    tied = (keys == edge[:, None, None]).sum(-1)
    short = take - shards.sum(above.sum(-1))                                    # [B]: slots the ties fill
    # ties in global unit order: gathered [B, world, blocks, h] -> [B, blocks, world, h]
    batch, units = tied.shape
    everyone = shards.gather(tied, dim=1).view(batch, shards.world, blocks, units // blocks).transpose(1, 2)
    before = everyone.flatten(1).cumsum(-1) - everyone.flatten(1)
    granted = torch.minimum((short[:, None] - before).clamp_min(0), everyone.flatten(1))
    mine = granted.view(batch, blocks, shards.world, units // blocks)[:, :, shards.rank].reshape(batch, units)
    return reserved + above + mine


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """``long``, same shape, in ``[0, 2³²)``: float32 ``values`` as integers with the same order (IEEE bits
    with the magnitude of negatives flipped), so a radix select can work on their bits."""
    bits = values.float().contiguous().view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31


def kth_largest(keys: torch.Tensor, k: torch.Tensor, shards: HeadShards = LOCAL) -> torch.Tensor:
    """``long [B]``: the ``k``-th largest of the keys ``[B, N]`` (in ``[0, 2³²)``; negative ones are ignored) over
    all ranks; ``2³²`` (above every key) where ``k`` is 0. Radix select, 8 bits per round, most significant first."""
    prefix = torch.zeros_like(k)
    left = k.clamp_min(1)
    live = keys >= 0
    for shift in (24, 16, 8, 0):
        match = live & ((keys >> (shift + 8)) == (prefix[:, None] >> (shift + 8)))
        digit = torch.where(match, (keys >> shift) & 255, 256)
        # int32: a row's slots over all ranks number fewer than 2³¹, and the histogram is what the ranks send
        hist = torch.zeros(keys.shape[0], 257, dtype=torch.int32, device=keys.device)
        hist = shards.sum(hist.scatter_add_(1, digit, torch.ones_like(digit, dtype=torch.int32))[:, :256])
        at_or_above = hist.flip(-1).cumsum(-1).flip(-1)                          # [B, 256]: keys >= digit d
        chosen = ((at_or_above >= left[:, None]).sum(-1) - 1).clamp_min(0)
        left = left - (at_or_above - hist).gather(1, chosen[:, None])[:, 0]     # minus the keys above d
        prefix = prefix | (chosen << shift)
    return torch.where(k > 0, prefix, 2**32)


def calibrate(scores: torch.Tensor, valid: torch.Tensor, how: str, shards: HeadShards = LOCAL) -> torch.Tensor:
    """Make one layer's ``[B, H, n]`` scores comparable with other layers' (per row), as float32.

    ``zscore``: subtract the mean, divide by the standard deviation of the valid slots (float64 sums, so a layer
    split over ranks gets the same numbers); ``rank``: the fraction of valid slots scoring below (ties: the
    earlier slot, heads in order); ``none``: unchanged. Under tensor parallelism the layer is all of its ranks'
    heads: ``zscore`` all-reduces three numbers per row, ``rank`` gathers the layer's scores.
    """
    if how == "none":
        return scores.float()
    if how == "zscore":
        flat, mask = scores.double().flatten(1), valid.flatten(1)
        count = shards.sum(mask.sum(-1, keepdim=True)).clamp(min=1)
        mean = shards.sum((flat * mask).sum(-1, keepdim=True)) / count
        std = shards.sum(((flat - mean) * mask).pow(2).sum(-1, keepdim=True)).div(count).sqrt().clamp(min=1e-12)
        return ((flat - mean) / std).float().view_as(scores)
    whole, whole_valid = shards.gather(scores.float(), dim=1), shards.gather(valid, dim=1)
    flat, mask = whole.flatten(1), whole_valid.flatten(1)
    below = ranks(flat.masked_fill(~mask, float("-inf")), descending=False) - (~mask).sum(-1, keepdim=True)
    calibrated = (below.float() / mask.sum(-1, keepdim=True).clamp(min=1)).view_as(whole)
    return calibrated[:, shards.heads(scores.shape[1])]
