"""Which cache layer each model layer gets under a pipeline: ``Layout``.

Full-attention layers get a ``KVPipeLayer``; window layers transformers' ``DynamicSlidingWindowLayer`` or, when
the pipeline's ``layers.sliding`` says so, a ``QuantizedWindowLayer``; state layers the layer transformers'
``DynamicCache`` makes for them. A layout that would compress nothing, or evict where no layer can evict, is
refused: no pipeline silently does less than it says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from kvpipe.core.plan import Plan
from kvpipe.core.quantization import Quantization
from kvpipe.errors import UnsupportedModelError
from kvpipe.runtime.adapters import kv_shape
from kvpipe.runtime.layer_kinds import COMPRESSED, STATE, WINDOW, LayerKind, describe, layer_kinds, text_config
from kvpipe.runtime.quantized_store import stored_format
from kvpipe.runtime.window_layer import QuantizedWindowLayer

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# auto quantizes a window when its quantized form holds at most this fraction of its bytes
WORTH_QUANTIZING = 0.75


@dataclass
class Layout:
    kinds: list[LayerKind]
    windows: Quantization | None     # how window layers store older tokens; None: as transformers keeps them
    config: PretrainedConfig         # the decoder's config: transformers makes the state layers from it

    def fresh_layers(self) -> list[Any]:
        """One empty cache layer per model layer, ``None`` where a ``KVPipeLayer`` goes (``KVPipeCache.bind``);
        the others are transformers' layer classes (which differ between releases)."""
        states = DynamicCache(config=self.config).layers if any(k.role == STATE for k in self.kinds) else []
        layers: list[Any] = []
        for index, kind in enumerate(self.kinds):
            if kind.role == COMPRESSED:
                layers.append(None)
            elif kind.role == WINDOW:
                layers.append(QuantizedWindowLayer(kind.window, self.windows) if self.windows is not None
                              else DynamicSlidingWindowLayer(sliding_window=kind.window))
            else:
                layers.append(states[index])
        return layers

    @property
    def mixed(self) -> bool:
        """Whether some layer is not kvpipe's."""
        return any(kind.role != COMPRESSED for kind in self.kinds)


def plan_layout(pipeline: Plan, model: PreTrainedModel, backend: str) -> Layout:
    """The layout of ``model``'s cache under ``pipeline`` (its ``layers.sliding`` policy), checked."""
    kinds = layer_kinds(model)
    name = type(model).__name__
    config = text_config(model)
    windows = _window_storage(pipeline, kinds, model, backend)
    compressed = [kind for kind in kinds if kind.role == COMPRESSED]
    if not compressed and windows is None and pipeline.compresses:
        policy = pipeline.spec.layers.sliding
        why = (f"its {describe(kinds)} windows are too short for quantization to save a quarter of their bytes "
               "(layers: {sliding: auto}); set layers: {sliding: quantize} to quantize them anyway"
               if policy == "auto" and pipeline.storage_stage is not None else
               f"this pipeline leaves sliding windows as transformers keeps them (layers: {{sliding: {policy}}}) "
               "and eviction does not apply inside a window; use a quantizing pipeline (int4)")
        raise UnsupportedModelError(f"{name} has no full-attention layer, so nothing would be compressed: {why}")
    if not compressed and pipeline.evicts:
        raise UnsupportedModelError(
            f"{name} has {describe(kinds)} layers and no full-attention layer to evict from; eviction does not "
            "apply inside a sliding window. Use a pipeline that only quantizes (int4)")
    if any(kind.role == STATE for kind in kinds):
        made = DynamicCache(config=config).layers
        plain = [index for index, kind in enumerate(kinds) if kind.role == STATE and type(made[index]) is DynamicLayer]
        if plain:
            raise UnsupportedModelError(
                f"{name} has {describe(kinds)} layers, and this transformers' DynamicCache keeps no state for "
                f"{kinds[plain[0]].type} layers (the model uses a cache class of its own); kvpipe needs a transformers "
                "release whose DynamicCache holds them (5.25 does)")
    return Layout(kinds, windows, config)


def _window_storage(pipeline: Plan, kinds: list[LayerKind], model, backend: str) -> Quantization | None:
    """How window layers store older tokens under the pipeline's ``layers.sliding`` policy."""
    policy = pipeline.spec.layers.sliding
    widest = max((kind.window for kind in kinds if kind.role == WINDOW), default=None)
    if widest is None or policy == "keep" or pipeline.storage_stage is None:
        return None
    _, head_dim = kv_shape(model)
    quant = stored_format(pipeline, head_dim, backend)
    if policy == "quantize":
        return quant
    dtype = next(model.parameters()).dtype
    full = 2 * head_dim * dtype.itemsize                          # a token's key and value as transformers keeps them
    group = quant.fmt.group
    # most a quantized window holds: pages over the window and a page of older tokens, the residual and a page
    quantized = (widest + group) * quant.slot_bytes(head_dim) + (quant.residual + group) * full
    return quant if quantized <= WORTH_QUANTIZING * widest * full else None
