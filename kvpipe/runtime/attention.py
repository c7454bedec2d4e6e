"""The attention function kvpipe installs: per-head masks over a compressed layer, and observation.

Only the attention function sees post-RoPE queries, so this is where stages observe. One name is
registered per wrapped base implementation (``kvpipe_sdpa``, ``kvpipe_eager``) together with that
base's mask function: without the mask registration transformers builds no mask and padding is lost.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from kvpipe.errors import UnsupportedModelError
from kvpipe.runtime.adapters import ATTENTION_BASES
from kvpipe.runtime.cache import KVPipeLayer

MASK_BLOCK_BYTES = 64 << 20


def wrapped_name(base: str) -> str:
    return f"kvpipe_{base}"


def register_attention(base: str) -> str:
    """Register (idempotently) the kvpipe attention wrapping ``base``; returns its name."""
    name = wrapped_name(base)
    AttentionInterface.register(name, kvpipe_attention)
    AttentionMaskInterface.register(name, ATTENTION_BASES[base])
    return name


def kvpipe_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, **kwargs):
    """``query [B, Hq, q, D]``, ``key``/``value [B, Hkv, kv, D]`` as returned by the cache. ``dropout`` is taken
    by position too, as transformers' own attention functions do (kvpress's wrapper passes it so)."""
    session = getattr(module, "_kvpipe_session", None)
    if session is None:
        raise UnsupportedModelError(
            "this model's attention implementation is a kvpipe one but no pipeline is attached to it; "
            "restore it with model.set_attn_implementation('sdpa') or attach a pipeline")
    forward = session.active
    if forward is None:
        return session.base_attention(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    layer = forward.cache.layers[module.layer_idx]
    if not isinstance(layer, KVPipeLayer):      # a window or another layer transformers keeps: its own mask
        return session.base_attention(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    if layer.reads_store_itself(query.shape[2]):
        return fused_attention(layer, query, key, value, kwargs.get("scaling")), None
    if forward.observing:
        session.observe(forward, module, query, key, value, kwargs.get("scaling"), kwargs.get("position_ids"))
    if layer.static_tail is not None and query.shape[2] == 1:       # the layer returned its whole static tail
        mask = static_tail_mask(layer, query, session.base == "eager")
        return session.base_attention(module, query, key, value, mask, dropout=dropout, **kwargs)
    # Without padding (no HF mask) and with every stored slot valid, the plain causal rule is already right.
    if layer.store is None or (attention_mask is None and layer.store.all_valid):
        return session.base_attention(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    return blockwise_attention(session, module, layer, query, key, value, attention_mask, dropout, kwargs)


def fused_attention(layer, query: torch.Tensor, tail_keys: torch.Tensor, tail_values: torch.Tensor,
                    scaling: float | None) -> torch.Tensor:
    """One decode step over a quantized layer with the fused Triton kernel: ``[B, 1, Hq, D]``. The tail (which
    holds the new token) is passed as is; after compaction it holds real tokens only, so no mask is needed (a
    static tail: the kernel reads how many of its slots are filled from the device)."""
    from kvpipe.kernels.triton_decode import fused_decode_attention

    static = layer.static_tail
    return fused_decode_attention(query, layer.store.decode_operands, tail_keys, tail_values,
                                  scaling if scaling is not None else query.shape[-1] ** -0.5,
                                  tail_length=static.device_length if static is not None else None).contiguous()


def blockwise_attention(session, module, layer, query, key, value, hf_mask, dropout, kwargs):
    """Base attention over a compressed layer with kvpipe's mask, a block of query rows at a time.

    A mask per query head is ``q × kv`` bytes a head: a 4,096-token prefill chunk over 36k slots with 32 heads
    would build 4.8 GB, and SDPA converts a bool mask to floats besides. Rows are independent, so each block's
    mask is kept under ``MASK_BLOCK_BYTES``; a layer whose heads all hold every slot needs one mask for all
    heads and no blocks. Returns what the base returns: ``[B, q, Hq, D]`` and the weights or ``None``."""
    batch, q_heads, q, _ = query.shape
    per_row = batch * q_heads * key.shape[2]
    rows = q if layer.store.all_valid else max(1, MASK_BLOCK_BYTES // per_row)
    additive = session.base == "eager"
    outputs, weights = [], []
    for start in range(0, q, rows):
        block = slice(start, min(start + rows, q))
        mask = per_head_mask(layer, query, hf_mask, block, additive)
        out, weight = session.base_attention(module, query[:, :, block], key, value, mask, dropout=dropout, **kwargs)
        outputs.append(out)
        weights.append(weight)
    if len(outputs) == 1:
        return outputs[0], weights[0]
    return torch.cat(outputs, 1), (None if weights[0] is None else torch.cat(weights, 2))


def static_tail_mask(layer, query: torch.Tensor, additive: bool) -> torch.Tensor:
    """Mask ``[B, 1 or Hq, 1, width + capacity]`` for one new token over a compressed layer with a static tail:
    the store's kept slots, then the tail's filled slots (the new token included). Built on the device from the
    tail's device-side length: the same shape every step, no host read. Transformers' own mask is not needed:
    one new token sees every earlier real token, and padding never reaches a store or a decode step's tail."""
    store, tail = layer.store, layer.static_tail
    batch, q_heads = query.shape[:2]
    filled = tail.valid()                                                          # [capacity]
    if store.all_valid:
        mask = torch.cat([filled.new_ones(store.width), filled])[None, None, None, :]
    else:
        valid = store.valid()                                                      # [B, Hkv, width]
        heads = valid.shape[1]
        mask = torch.cat([valid, filled.expand(batch, heads, -1)], -1)
        mask = mask[:, :, None, None, :].expand(batch, heads, q_heads // heads, 1, mask.shape[-1]).flatten(1, 2)
    if additive:
        return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min)
    return mask


def per_head_mask(layer, query: torch.Tensor, hf_mask: torch.Tensor | None, rows: slice,
                  additive: bool) -> torch.Tensor:
    """Mask ``[B, Hq, r, width + T]`` for the query ``rows`` over a compressed layer: kept slots per head, then
    HF's new-token block; ``[B, 1, r, width + T]`` when every slot of every head holds a token.

    HF's mask is built for one physical width shared by all layers; thanks to ``get_mask_sizes`` its last
    ``q`` columns are exactly the new tokens (causal + padding), so only those are reused.
    """
    batch, q_heads, q, _ = query.shape
    past = layer.physical_length - q
    if hf_mask is None:
        new = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()[None, None, rows]
    elif hf_mask.dtype == torch.bool:
        new = hf_mask[..., rows, -q:]
    else:
        new = hf_mask[..., rows, -q:] == 0
    r = new.shape[-2]
    if layer.store.all_valid:
        mask = torch.cat([new.new_ones(new.shape[0], 1, r, past), new.expand(-1, 1, r, q)], dim=-1)
    else:
        valid = layer.past_valid(past)                                              # [B, Hkv, past]
        heads = valid.shape[1]
        group = q_heads // heads
        # One allocation: both parts are expanded over the query heads of a group before the concatenation.
        mask = torch.cat([valid[:, :, None, None, :].expand(batch, heads, group, r, past),
                          new[:, :, None].expand(batch, heads, group, r, q)], dim=-1).flatten(1, 2)
    if additive:
        return torch.full(mask.shape, torch.finfo(query.dtype).min, dtype=query.dtype,
                          device=query.device).masked_fill_(mask, 0.0)
    return mask
