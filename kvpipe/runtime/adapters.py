"""Everything kvpipe knows about a model family and a transformers release, in one place.

Adding a model family or supporting a new transformers release touches this module and its tests:
where the decoder and its layers are, which attention implementations kvpipe can wrap (and the mask function
each needs), what a layer exposes to observers (the output projection, the rotary embedding), the name of the
decoder's cache argument, the argument of ``get_mask_sizes``, and the models refused, with the reason worded
for what their layers really hold.
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask

from kvpipe.errors import UnsupportedModelError
from kvpipe.runtime.layer_kinds import layer_kinds, text_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# attention implementations kvpipe wraps, with the mask function transformers must build for each
ATTENTION_BASES: dict[str, Callable[..., Any]] = {"sdpa": sdpa_mask, "eager": eager_mask}


def base_attention_function(base: str, decoder: torch.nn.Module):
    """The function the wrapper delegates to: HF's sdpa, or the model module's own eager attention."""
    if base == "sdpa":
        return sdpa_attention_forward
    # Eager is not in HF's registry: each modeling file defines its own eager function.
    attention = next(layer.self_attn for layer in decoder_layers(decoder)
                     if getattr(layer, "self_attn", None) is not None)
    return sys.modules[type(attention).__module__].eager_attention_forward


def find_decoder(model: PreTrainedModel) -> torch.nn.Module:
    """The decoder stack (``model.model`` for HF causal LMs), checked for what kvpipe needs."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    attentions = [getattr(layer, "self_attn", None) for layer in layers] if layers is not None else []
    if not any(attentions) or not all(hasattr(a, "layer_idx") for a in attentions if a is not None):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a decoder-only model with `model.layers[i].self_attn`; "
            "kvpipe supports Llama-style Hugging Face causal LMs (Llama, Qwen2/3, Mistral, Gemma, GPT-OSS, "
            "SmolLM...)")
    return decoder


def attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The decoder's attention modules (``layers[i].self_attn``); layers without one (linear attention, state
    space) are left out."""
    return [layer.get_submodule("self_attn") for layer in decoder_layers(find_decoder(model))
            if getattr(layer, "self_attn", None) is not None]


def decoder_layers(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's layers (``decoder.layers``), in order."""
    return list(cast(torch.nn.ModuleList, decoder.get_submodule("layers")))


def check_model(model: PreTrainedModel) -> None:
    config = model.config
    if getattr(model, "_kvpipe_session", None) is not None:
        raise UnsupportedModelError("a kvpipe pipeline is already attached to this model; detach it first")
    base = config._attn_implementation
    if base not in ATTENTION_BASES:
        raise UnsupportedModelError(
            f"attention implementation {base!r} is not supported: per-head eviction needs an arbitrary mask. "
            "Load the model with attn_implementation='sdpa' (or 'eager')")
    if getattr(config, "kv_lora_rank", None):
        raise UnsupportedModelError(
            f"{type(model).__name__} uses multi-head latent attention (MLA, kv_lora_rank={config.kv_lora_rank}): its "
            "cache holds one compressed latent per token shared by all heads, not per-head keys and values, so "
            "kvpipe's per-head eviction and quantization do not apply. kvpipe supports attention with per-head keys "
            "and values (Llama, Qwen2/3, Mistral, Gemma, GPT-OSS, SmolLM...)")
    layer_kinds(model)          # refuses the layer kinds kvpipe cannot hold, naming them


def kv_shape(model: PreTrainedModel) -> tuple[int, int]:
    """``(KV heads, head dimension)`` of the model's attention layers, from its (text) config."""
    config = text_config(model)
    heads = config.num_attention_heads
    return (getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def cache_keyword(decoder: torch.nn.Module) -> str:
    """The decoder's cache argument: transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name is
    accepted until 5.40); callers may use either, the decoder is given the one it declares."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def query_length(argument: int | torch.Tensor) -> int:
    """``get_mask_sizes``' argument as a length: transformers < 5.3 passes ``cache_position`` (one entry per new
    token), later versions the length itself."""
    return argument.shape[0] if isinstance(argument, torch.Tensor) else argument


def output_projection(attention: torch.nn.Module) -> torch.Tensor | None:
    """``W_O [hidden, Hq·D]`` of an attention module, or ``None`` when it has no ``o_proj``. Under tensor
    parallelism the weight is a DTensor sharded by its input columns: this rank's columns are its query heads'.
    Offloaded by accelerate (``device_map`` with "cpu"/"disk"), it is on the meta device until ``o_proj``'s own
    forward, after attention: it is read from the hook's offloaded weights instead."""
    projection = getattr(attention, "o_proj", None)
    weight = getattr(projection, "weight", None)
    if weight is not None and weight.is_meta:
        hook = getattr(projection, "_hf_hook", None)
        offloaded = getattr(hook, "weights_map", None)
        if offloaded is None:
            raise UnsupportedModelError("this attention's o_proj weight is on the meta device and no accelerate hook "
                                        "holds it; value-aware stages need W_O: load the model with its weights")
        return offloaded["weight"].to(hook.execution_device)
    return weight.to_local() if hasattr(weight, "to_local") else weight


def rope_tables(model: PreTrainedModel) -> Callable[[torch.Tensor, torch.Tensor], tuple] | None:
    """``(x, positions [B, q]) -> (cos, sin) [B, q, D]`` of the full-attention layers' rotary embedding in HF's
    rotate-half layout over the whole head (``x·cos + rotate_half(x)·sin``), or ``None`` without one. Gemma 3 keeps
    one embedding per layer type (the full layers' is asked for); GPT-OSS returns half-width tables it applies to
    both halves (widened here). A partial rotary embedding (Qwen3-Next rotates a quarter of each head) has no such
    form: using the tables raises, naming it."""
    rotary = getattr(find_decoder(model), "rotary_emb", None)
    if rotary is None:
        return None
    per_type = "layer_type" in inspect.signature(rotary.forward).parameters
    config = text_config(model)
    rope = getattr(config, "rope_parameters", None) or {}
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) \
        if isinstance(rope, dict) else getattr(config, "partial_rotary_factor", 1.0)

    def tables(x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary(x, positions, "full_attention") if per_type else rotary(x, positions)
        dim = x.shape[-1]
        if cos.shape[-1] == dim // 2 and partial == 1.0:
            cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
        if cos.shape[-1] != dim:
            raise UnsupportedModelError(
                f"{type(model).__name__} rotates {cos.shape[-1]} of each head's {dim} channels (partial rotary "
                "embedding); stages that rotate queries to other positions (expected_attention) need a rotary "
                "embedding over the whole head. Use a stage that does not (attention_mass, value_aware, ...)")
        return cos, sin

    return tables
