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
    if forward is not None:
        layer = forward.cache.layers[module.layer_idx]
        if layer.reads_store_itself(query.shape[2]):
            return fused_attention(layer, query, key, value, kwargs.get("scaling")), None
        # Without padding (no HF mask) and with every stored slot valid, the plain causal rule is already right.
        if layer.store is not None and not (attention_mask is None and layer.store.all_valid):
            attention_mask = per_head_mask(layer, query, attention_mask, additive=session.base == "eager")
        if forward.observing:
            session.observe(forward, module, query, key, value, kwargs.get("scaling"), kwargs.get("position_ids"))
    return session.base_attention(module, query, key, value, attention_mask, dropout=dropout, **kwargs)


def fused_attention(layer, query: torch.Tensor, tail_keys: torch.Tensor, tail_values: torch.Tensor,
                    scaling: float | None) -> torch.Tensor:
    """One decode step over a quantized layer with the fused Triton kernel: ``[B, 1, Hq, D]``. The tail (which
    holds the new token) is passed as is; after compaction it holds real tokens only, so no mask is needed."""
    from kvpipe.kernels.triton_decode import fused_decode_attention

    store = layer.store
    return fused_decode_attention(query, store.pages, store.page_counts, store.quant.fmt, store.residual.keys,
                                  store.residual.values, store.residual.lengths, tail_keys, tail_values,
                                  scaling if scaling is not None else query.shape[-1] ** -0.5,
                                  page_starts=store.page_starts, residual_starts=store.residual.starts).contiguous()


def per_head_mask(layer, query: torch.Tensor, hf_mask: torch.Tensor | None, additive: bool) -> torch.Tensor:
    """Mask ``[B, Hq, q, width + T]`` for a compressed layer: kept slots per head, then HF's new-token block.

    HF's mask is built for one physical width shared by all layers; thanks to ``get_mask_sizes`` its last
    ``q`` columns are exactly the new tokens (causal + padding), so only those are reused.
    """
    batch, q_heads, q, _ = query.shape
    past = layer.physical_length - q
    valid = layer.past_valid(past)                                                  # [B, Hkv, past]
    if hf_mask is None:
        new = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()[None, None]
    elif hf_mask.dtype == torch.bool:
        new = hf_mask[..., -q:]
    else:
        new = hf_mask[..., -q:] == 0
    heads = valid.shape[1]
    mask = torch.cat([valid[:, :, None, :].expand(batch, heads, q, past),
                      new.expand(batch, heads, q, q)], dim=-1)
    mask = mask.repeat_interleave(q_heads // heads, dim=1)
    if additive:
        return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min)
    return mask
