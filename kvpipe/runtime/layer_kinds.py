"""What each decoder layer of a model caches, read from its config, and which of those layers kvpipe compresses.

Three roles:

* **compressed** — full-attention layers: a ``KVPipeLayer`` each (eviction, quantization, everything);
* **window** — sliding-window and chunked layers: a bounded window of recent tokens, kept as transformers keeps it
  (``DynamicSlidingWindowLayer``) or quantized (``runtime.window_layer``), as the pipeline's ``layers.sliding``
  says; their masks stay transformers' own;
* **state** — linear-attention, convolution and attention-less layers: a fixed-size state (or nothing), kept
  untouched in the layer transformers makes for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvpipe.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

COMPRESSED, WINDOW, STATE = "compressed", "window", "state"

# transformers' layer types, by role; for windows the config field that holds the window
WINDOW_FIELDS = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}
STATE_TYPES = {
    "linear_attention": "a linear-attention state (Gated DeltaNet, Mamba)",
    "mamba": "a state-space state",
    "conv": "a short-convolution state",
    "moe": "no attention", "mlp": "no attention", "dummy": "no attention (another layer's keys and values)",
}
# kinds kvpipe cannot hold beside the ones above, and why
REFUSED_TYPES = {
    "hybrid": "a linear-attention state and full attention in one layer, which needs transformers' own combined layer",
    "hybrid_sliding": "a linear-attention state and a sliding window in one layer, which needs transformers' own "
                      "combined layer",
    "indexed_attention": "an indexer cache beside its keys (DeepSeek sparse attention), which kvpipe does not keep",
}


@dataclass(frozen=True)
class LayerKind:
    """One decoder layer: its transformers layer type and, for a window layer, how many tokens it attends to."""

    type: str                    # "full_attention", "sliding_attention", "linear_attention", ...
    window: int | None = None

    @property
    def role(self) -> str:
        if self.type == "full_attention":
            return COMPRESSED
        return WINDOW if self.type in WINDOW_FIELDS else STATE


def text_config(model: PreTrainedModel):
    """The decoder's config (a multimodal model's text config)."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def layer_kinds(model: PreTrainedModel) -> list[LayerKind]:
    """Every decoder layer's kind, from ``layer_types`` (or, without it, ``sliding_window`` /
    ``attention_chunk_size`` for all layers, as transformers reads them). Refuses kinds kvpipe cannot hold."""
    config = text_config(model)
    types = list(getattr(config, "layer_types", None) or [_uniform_type(config)] * config.num_hidden_layers)
    refused = sorted(set(types) & set(REFUSED_TYPES))
    unknown = sorted(set(types) - {"full_attention", *WINDOW_FIELDS, *STATE_TYPES, *REFUSED_TYPES})
    if refused or unknown:
        why = "; ".join([f"{kind} layers keep {REFUSED_TYPES[kind]}" for kind in refused] +
                        [f"{kind} layers are a kind kvpipe does not know" for kind in unknown])
        raise UnsupportedModelError(f"{type(model).__name__} has {_counts(types, refused + unknown)}: {why}. kvpipe "
                                    "holds full-attention, sliding-window, chunked and linear-attention layers")
    kinds = [LayerKind(kind, getattr(config, WINDOW_FIELDS[kind]) if kind in WINDOW_FIELDS else None)
             for kind in types]
    if not any(kind.role != STATE for kind in kinds):
        raise UnsupportedModelError(f"{type(model).__name__} has {_counts(types, sorted(set(types)))} and no "
                                    "attention layer: its cache is a fixed-size state, there are no keys and values "
                                    "to compress")
    return kinds


def _uniform_type(config) -> str:
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding_attention"
    if getattr(config, "attention_chunk_size", None) is not None:
        return "chunked_attention"
    return "full_attention"


def _counts(types: list[str], which: list[str]) -> str:
    return ", ".join(f"{types.count(kind)} {kind} layers" for kind in which) + f" out of {len(types)}"


def describe(kinds: list[LayerKind]) -> str:
    """``"5 sliding_attention (window 1024), 1 full_attention"``: for messages."""
    seen: dict[LayerKind, int] = {}
    for kind in kinds:
        seen[kind] = seen.get(kind, 0) + 1
    return ", ".join(f"{count} {kind.type}" + (f" (window {kind.window})" if kind.window else "")
                     for kind, count in seen.items())
