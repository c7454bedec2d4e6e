"""What ``handle.stats()`` returns: a typed record of a cache's memory and timings, readable as a dict too.

Every field is measured, never estimated: bytes from the storage of the tensors a cache holds, times from the
clock. Under tensor parallelism every rank gets the whole model's numbers (bytes summed over ranks, times the
slowest rank's, ``kept_tokens`` of every rank's heads in rank order).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvpipe.runtime.cache import KVPipeLayer, layer_bytes
from kvpipe.runtime.layer_kinds import COMPRESSED, STATE, WINDOW
from kvpipe.runtime.window_layer import QuantizedWindowLayer


def _doc(text: str, **kwargs) -> Any:
    return field(metadata={"doc": text}, **kwargs)


@dataclass(frozen=True, eq=False)       # compared as a Mapping: equal to the dict of its fields
class Stats(Mapping):
    """``handle.stats()``: fields below; ``stats["kv_bytes"]``, ``dict(stats)`` and ``stats.dict()`` work too."""

    kv_bytes: int = _doc("bytes of the keys and values held, with their positions and per-head lengths; a static "
                         "decode tail's empty slots included")
    held_bytes: int = _doc("every byte of tensor storage the cache keeps alive, each storage once: `kv_bytes` plus "
                           "validity masks, decode kernel buffers and the dequantization workspace")
    tail_reserve_bytes: int = _doc("the part of `kv_bytes` in static decode tails' empty slots: room for the next "
                                   "decode steps, never more than the layer saved")
    kv_bytes_full: int = _doc("an uncompressed cache of the same tokens in the model's dtype")
    kv_bytes_full_16bit: int = _doc("the same in bf16/fp16: what a GPU deployment of the full cache holds")
    compression_ratio: float = _doc("`kv_bytes_full / kv_bytes`; never below 1 (`layers_kept_whole`)")
    kept_tokens: torch.Tensor = _doc("`long [layers, B, Hkv]`: slots held per compressed layer, row and KV head "
                                     "(store + tail)")
    seen_tokens: int = _doc("tokens fed: what `get_seq_length()` returns (RoPE positions follow it)")
    compress_seconds: float = _doc("time in the compression phase, observation excluded")
    probe_seconds: float = _doc("time probing stages (`reconstruction`) spent re-reading the context")
    compressing_forward_seconds: float = _doc("time of the forwards that ended in a compression")
    probe_vs_forward: float = _doc("`probe_seconds / compressing_forward_seconds`; 0 without probing stages")
    kv_bytes_peak: int = _doc("the most the cache held after any forward, before that forward's compression")
    budget_met: bool = _doc("the last compression kept no more than the budget")
    layers_kept_whole: int = _doc("layers the last compression left uncompressed because storing them compressed "
                                  "would have cost more (a short prompt)")
    budget_shortfall: int = _doc("slots kept beyond the budget because they were protected (a prompt shorter than "
                                 "the sinks and window); 0 when met")
    collective_bytes: int = _doc("what compressions sent between tensor-parallel ranks, all ranks together")
    kv_bytes_by_kind: dict = _doc("`kv_bytes` by layer kind: `compressed` (full-attention layers, kvpipe's), "
                                  "`window` (sliding-window layers), `state` (linear-attention states); only the "
                                  "kinds the model has")

    # --- the dict a caller of earlier versions read ------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)

    def dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self}


def stats_reference() -> str:
    """The Markdown table of ``docs/stats.md``'s fields (a test keeps the page current)."""
    rows = [f"| `{f.name}` | `{getattr(f.type, '__name__', f.type)}` | {f.metadata['doc']} |" for f in fields(Stats)]
    return "| field | type | what |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def role(layer) -> str:
    """A cache layer's kind (``runtime.layer_kinds``): ``compressed``, ``window`` or ``state``."""
    if isinstance(layer, KVPipeLayer):
        return COMPRESSED
    return WINDOW if isinstance(layer, DynamicSlidingWindowLayer) else STATE


def bytes_by_role(layers: Sequence) -> dict[str, int]:
    """``kv_bytes`` of cache ``layers`` by kind, in the order compressed, window, state; only kinds present."""
    totals: dict[str, int] = {}
    for layer in layers:
        kind = role(layer)
        totals[kind] = totals.get(kind, 0) + layer_bytes(layer)
    return {kind: totals[kind] for kind in (COMPRESSED, WINDOW, STATE) if kind in totals}


def uncompressed_bytes(layers: Sequence) -> tuple[int, int]:
    """``(kv_bytes_full, kv_bytes_full_16bit)`` of cache ``layers`` as transformers would hold the same tokens. A kvpipe
    layer: every token seen; a quantized window: its window's ``min(seen, sliding_window - 1)`` tokens (what
    ``DynamicSlidingWindowLayer`` keeps after a forward); windows and states kept as transformers keeps them:
    their own bytes (the 16-bit figure counts those as they are)."""
    full = full_16bit = 0
    for layer in layers:
        if isinstance(layer, (KVPipeLayer, QuantizedWindowLayer)):
            if not layer.is_initialized:
                continue
            batch, heads, _, dim = layer.keys.shape
            tokens = layer.seen if isinstance(layer, KVPipeLayer) else min(layer.cumulative_length,
                                                                            layer.sliding_window - 1)
            elements = 2 * batch * heads * tokens * dim
            full += elements * layer.keys.dtype.itemsize
            full_16bit += 2 * elements
        else:
            full += layer_bytes(layer)
            full_16bit += layer_bytes(layer)
    return full, full_16bit
