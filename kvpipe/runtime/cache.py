"""The compressed cache: a transformers ``DynamicCache`` whose layers can hold fewer tokens than were fed.

Each ``KVPipeLayer`` holds two parts:

* ``store`` — the slots kept at the last compression (per-head lengths differ): a ``RaggedStore``, or a
  ``QuantizedStore`` (packed low-bit pages + a full-precision residual) when the pipeline quantizes;
* a *tail* — ``self.keys``/``self.values [B, Hkv, T, D]``, the tokens fed since then, uncompressed. A quantized
  store takes the tail in after every forward that filled at least one page (``settle``), as KIVI flushes.
  One-token decode steps that no stage observes write into a ``StaticTail`` instead (``runtime.tail``): a
  buffer of the store's ``tail_capacity`` slots with its length on the device, so that between two flushes
  every step runs the same operators on the same shapes, with no host read (what a CUDA graph needs).
  ``self.keys``/``self.values`` then read its filled part.

Before the first compression the layer behaves exactly like ``DynamicLayer`` (so an attached model
with nothing evicted gives bit-identical outputs). ``get_seq_length()`` is the **logical** number of
tokens fed, never the number kept: transformers derives RoPE positions and resume offsets from it.

A cache stands alone: it holds its stores and the ``Storage`` they are built with (kernel backend, dequantization
workspace), and nothing of a model. ``kvpipe.runtime.compressor.compress`` compresses it, attached or not. An
attach drives it through a ``Binding``: a few flags that its hooks set, which let the cache refuse forwards that
are not the attached model's and tell attention to read quantized stores itself.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from kvpipe.core.context import LayerView
from kvpipe.core.quantization import Quantization
from kvpipe.core.shards import LOCAL, HeadShards
from kvpipe.runtime import adapters
from kvpipe.runtime.backend import packer
from kvpipe.runtime.binding import Binding
from kvpipe.runtime.held import held_bytes
from kvpipe.runtime.quantized_store import QuantizedStore, Workspace
from kvpipe.runtime.rows import SelectsRows
from kvpipe.runtime.store import RaggedStore, Store, storage_bytes
from kvpipe.runtime.tail import STATIC_TAIL_SLOTS, StaticTail
from kvpipe.runtime.window_layer import release_cut_storage


@dataclass
class Storage:
    """What a cache's layers store with: the kernels of ``backend`` and one dequantization workspace."""

    backend: str = "torch"                                   # "torch" or "triton" (kvpipe.runtime.backend)
    workspace: Workspace = field(default_factory=Workspace)


class KVPipeLayer(SelectsRows, DynamicLayer):
    is_croppable = False

    def __init__(self, storage: Storage, binding: Binding | None = None):
        self._static: StaticTail | None = None
        super().__init__()
        self.storage, self.binding = storage, binding
        self.seen = 0
        self.since_compression = 0     # tokens fed since the last compression (what decode triggers count)
        self.store: Store | None = None

    # The tail: a plain tensor pair, or the filled part of a static tail. Assigning one drops the static tail
    # (transformers' own code assigns them, as do compaction and row selection).
    @property
    def keys(self) -> torch.Tensor | None:
        return self._keys if self._static is None else self._static.filled()[0]

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._drop_static()
        self._keys = tensor

    @property
    def values(self) -> torch.Tensor | None:
        return self._values if self._static is None else self._static.filled()[1]

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._drop_static()
        self._values = tensor

    def _drop_static(self) -> None:
        """Back to a plain tail holding the static tail's tokens (both halves: one of them is about to be set)."""
        if self._static is not None:
            self._keys, self._values = self._static.filled()
            self._static = None

    @property
    def static_tail(self) -> StaticTail | None:
        """The static tail this layer's one-token steps write into, if any."""
        return self._static

    # --- the transformers layer contract -------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, q, D]`` and return everything to attend over, ``[B, Hkv, width + T, D]`` (a static
        tail: all its ``capacity`` slots, the empty ones masked by attention)."""
        if self.binding is not None:
            self.binding.check()
        new = key_states.shape[-2]
        tail = self._static_tail() if self._writes_in_place(key_states) else None
        if tail is not None:
            tail.write(key_states, value_states)
            keys, values = tail.keys, tail.values
        else:
            keys, values = super().update(key_states, value_states)
        self.seen += new
        self.since_compression += new
        if self.store is None or self.reads_store_itself(new):
            return keys, values                     # fused decode reads the packed store itself
        if torch.is_grad_enabled() and (keys.requires_grad or values.requires_grad):
            # a forward with gradients on: the stored part is constants (fresh buffers, not the shared
            # workspace, which autograd would otherwise hold on to), the new tokens keep their graph
            with torch.no_grad():
                stored = self.store.attend(keys[..., :0, :], values[..., :0, :])
            return torch.cat([stored[0], keys], -2), torch.cat([stored[1], values], -2)
        return self.store.attend(keys, values, self.storage.workspace)

    def _writes_in_place(self, key_states: torch.Tensor) -> bool:
        """One new token over a compressed layer, in a forward no stage observes and without gradients."""
        return (key_states.shape[-2] == 1 and self.store is not None and self.is_initialized
                and self.binding is not None and self.binding.static_decode
                and not (torch.is_grad_enabled() and key_states.requires_grad))

    def _static_tail(self) -> StaticTail | None:
        """The static tail, made from the plain tail on the first one-token step after a compression or a longer
        forward (a plain tail too long for it joins the store first, eager, once); ``None`` when its empty slots
        would make the layer larger than an uncompressed one (a store that saved fewer slots than a tail holds)."""
        if self._static is None:
            keys, values = self.keys, self.values
            capacity = min(self.store.tail_capacity, max(STATIC_TAIL_SLOTS, 1 << keys.shape[-2].bit_length()))
            if not self._fits(capacity, upcoming=1):
                return None
            if keys.shape[-2] >= self.store.tail_capacity:
                self._join_tail(keys, values)
                keys, values = keys[..., :0, :], values[..., :0, :]
            self._static = StaticTail(keys, values, capacity)
            self._keys = self._values = None
        return self._static

    def _fits(self, capacity: int, upcoming: int = 0) -> bool:
        """Whether the store and a static tail of ``capacity`` slots hold no more bytes than an uncompressed layer of
        the tokens seen (plus ``upcoming`` being fed): what ``kv_bytes`` must never exceed."""
        batch, heads, _, dim = self.keys.shape
        slot = batch * heads * 2 * dim * self.keys.dtype.itemsize
        return self.store.nbytes + capacity * slot <= (self.seen + upcoming) * slot

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # Width = what update() will return; the offset makes HF's last q mask columns the new tokens.
        physical = self.physical_length
        return physical + adapters.query_length(query_length), self.seen - physical

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a kvpipe cache cannot be cropped: evicted tokens cannot be put back")

    def reset(self) -> None:
        super().reset()
        self.seen, self.since_compression, self.store = 0, 0, None

    # --- what kvpipe adds -----------------------------------------------------------------------
    @property
    def tail_length(self) -> int:
        if self._static is not None:
            return self._static.length
        return self.keys.shape[-2] if self.is_initialized and self.keys.dim() == 4 else 0

    @property
    def physical_length(self) -> int:
        """Padded width attention sees: longest kept head plus the tail."""
        return (self.store.width if self.store is not None else 0) + self.tail_length

    def past_valid(self, upto: int) -> torch.Tensor:
        """``bool [B, Hkv, upto]``: validity of the first ``upto`` physical slots (store, then tail)."""
        batch, heads = self.keys.shape[:2]
        store = (self.store.valid() if self.store is not None
                 else self.keys.new_zeros((batch, heads, 0), dtype=torch.bool))
        tail = torch.ones(batch, heads, upto - store.shape[-1], dtype=torch.bool, device=store.device)
        return torch.cat([store, tail], dim=-1)

    def tail_positions(self) -> torch.Tensor:
        """``long [T]``: logical positions of the tail's tokens."""
        return torch.arange(self.seen - self.tail_length, self.seen, device=self.keys.device)

    def slot_valid(self, padding: torch.Tensor | None) -> torch.Tensor:
        """``bool [B, Hkv, width + T]``: which physical slots hold a real token. ``padding``: 2D mask ``[B, seen]``."""
        batch, heads, tail, _ = self.keys.shape
        tail_valid = (padding[:, self.tail_positions()].bool()[:, None].expand(batch, heads, tail)
                      if padding is not None else self.keys.new_ones((batch, heads, tail), dtype=torch.bool))
        return tail_valid if self.store is None else torch.cat([self.store.valid(), tail_valid], -1)

    def view(self, padding: torch.Tensor | None) -> LayerView:
        """Everything stored, padded per head, for stages. ``padding``: the 2D mask ``[B, seen]`` or None."""
        batch, heads, tail, _ = self.keys.shape
        tail_pos = self.tail_positions().expand(batch, heads, tail)
        valid = self.slot_valid(padding)
        if self.store is None:
            return LayerView(self.keys, self.values, tail_pos, valid)
        keys, values, positions = self.store.padded()
        return LayerView(torch.cat([keys, self.keys], -2), torch.cat([values, self.values], -2),
                         torch.cat([positions, tail_pos], -1), valid)

    def compact(self, view: LayerView, keep: torch.Tensor, fmt: Quantization | None = None) -> None:
        """Keep only ``keep & view.valid`` (``bool [B, Hkv, n]``), stored in ``fmt`` (a storage stage's format;
        ``None``: as they are); the rest is freed, not masked."""
        keep = keep & view.valid
        self.store = (QuantizedStore.from_padded(view.keys, view.values, view.positions, keep, fmt) if fmt is not None
                      else RaggedStore.from_padded(view.keys, view.values, view.positions, keep,
                                                   packer(self.storage.backend)))
        self._clear_tail()
        self.since_compression = 0

    def reads_store_itself(self, query_length: int) -> bool:
        """Whether this step's attention runs the fused Triton kernel over the packed store (one new token, a
        store the kernel reads, and a binding that says so: triton backend, no stage observing this forward)."""
        return (query_length == 1 and self.store is not None and self.store.fused_decode
                and self.binding is not None and self.binding.fused_decode)

    def settle(self) -> None:
        """After a forward: a full static tail grows (twice the slots) up to the store's ``tail_capacity``, then
        joins the store and starts over in the same buffers (each only while the layer stays no larger than an
        uncompressed one); a quantized store takes in a plain tail once it holds a whole page (KIVI's flush)."""
        if self.store is None:
            return
        if self._static is not None:
            if not self._static.full:
                return
            bigger = min(2 * self._static.capacity, self.store.tail_capacity)
            if bigger > self._static.capacity and self._fits(bigger):
                self._static = self._static.grown(bigger)
                return
            self._join_tail(*self._static.filled())
            if self._fits(self._static.capacity):
                self._static.clear()
            else:                       # no room for its empty slots: back to a plain tail, exact bytes
                self._clear_tail()
            return
        joins_at = self.store.joins_tail_at
        if joins_at is not None and self.tail_length >= joins_at:
            self._join_tail(self.keys, self.values)
            self._clear_tail()

    def _join_tail(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """The tail's tokens ``keys``/``values [B, Hkv, T, D]`` (all of them) go into the store."""
        batch, heads, tail, _ = keys.shape
        self.store = self.store.append(keys, values, self.tail_positions().expand(batch, heads, tail))

    def _clear_tail(self) -> None:
        self.keys, self.values = self.keys[..., :0, :].clone(), self.values[..., :0, :].clone()

    def kept_slots(self) -> torch.Tensor:
        """``long [B, Hkv]``: slots held per head (kept store slots plus the tail)."""
        batch, heads = self.keys.shape[:2]
        if self.store is None:
            return torch.full((batch, heads), self.tail_length, dtype=torch.long, device=self.keys.device)
        stored = self.store.lengths.long()
        return stored + self.tail_length

    @property
    def nbytes(self) -> int:
        """Bytes of storage this layer really holds."""
        if not self.is_initialized:
            return 0
        tail = self._static.nbytes if self._static is not None else storage_bytes(self.keys, self.values)
        return tail + (self.store.nbytes if self.store is not None else 0)

    @property
    def reserved_bytes(self) -> int:
        """Bytes of the static tail's empty slots: held for the decode steps to come (counted in ``nbytes``)."""
        return self._static.reserved_bytes if self._static is not None else 0

    def _select_rows(self, index: torch.Tensor) -> None:
        if self._static is not None:
            self._static = self._static.select_rows(index)
        else:
            self.keys, self.values = self.keys[index], self.values[index]
        if self.store is not None:
            self.store = self.store.select_rows(index)


def cache_bytes(cache: Cache) -> int:
    """Bytes a cache really holds: a kvpipe cache's stores and tails, transformers' layers' tensors."""
    return sum(layer_bytes(layer) for layer in cache.layers)


def layer_bytes(layer) -> int:
    """Bytes one cache layer really holds: a kvpipe layer's or quantized window's own count; for transformers'
    layers (full, sliding, linear-attention states) the storages of every tensor they hold (a sliding window cut
    from a longer concatenation holds all of it, as transformers' own layer does)."""
    return layer.nbytes if hasattr(layer, "nbytes") else held_bytes(layer)


def reserved_bytes(cache: KVPipeCache) -> int:
    """Bytes a kvpipe cache holds in its static tails' empty slots (part of ``cache_bytes``)."""
    return sum(layer.reserved_bytes for layer in cache.compressed_layers)


class KVPipeCache(DynamicCache):
    """A ``DynamicCache`` made of ``KVPipeLayer``s: ``KVPipeCache(layers)`` stands alone (torch kernels, no
    binding); ``handle.cache()`` makes one bound to an attached model."""

    storage: Storage
    binding: Binding | None       # set by the attach that made or adopted this cache
    compress_seconds: float       # time spent compressing (observation excluded)
    peak_bytes: int               # most bytes held after any forward, before that forward's compression
    budget_shortfall: int         # slots kept beyond the budget at the last compression (protected ones)
    layers_kept_whole: int        # layers the last compression left uncompressed: storing them would have cost more
    compressed_by: str | None     # the spec (JSON) of the pipeline that compressed it; None: never compressed
    compressing_forward_seconds: float   # time of the forwards that ended in a compression (before it)
    probe_seconds: float          # time probing stages spent re-reading the context (kvpipe.runtime.probe)
    shards: HeadShards            # which of the model's KV heads it holds (tensor parallelism: a rank's share)
    collective_bytes: int         # what its compressions sent to the other ranks (0 in one process)

    def __init__(self, layers: int | Sequence[CacheLayerMixin | None], storage: Storage | None = None,
                 binding: Binding | None = None, shards: HeadShards = LOCAL):
        Cache.__init__(self, layers=[])
        self.bind(layers, storage or Storage(), binding, shards)

    def bind(self, layers: int | Sequence[CacheLayerMixin | None], storage: Storage, binding: Binding | None,
             shards: HeadShards = LOCAL) -> None:
        """Fresh layers and counters (also for a plain ``DynamicCache`` adopted in place). ``layers``: how many, all
        kvpipe's; or one entry per model layer, ``None`` for a kvpipe layer, else the (empty) layer transformers
        keeps there (a sliding window, a linear-attention state: ``runtime.layout``)."""
        self.storage, self.binding, self.shards, self.collective_bytes = storage, binding, shards, 0
        layout = [None] * layers if isinstance(layers, int) else list(layers)
        self.layers = [KVPipeLayer(storage, binding) if layer is None else layer for layer in layout]
        self.compress_seconds, self.peak_bytes, self.budget_shortfall, self.layers_kept_whole = 0.0, 0, 0, 0
        self.compressed_by = None
        self.compressing_forward_seconds, self.probe_seconds = 0.0, 0.0

    @property
    def compressed_layers(self) -> list[KVPipeLayer]:
        """The layers kvpipe compresses, in model order: all of them for a model whose every layer is full
        attention; the others are windows and states kept transformers' way (``runtime.layout``)."""
        return [layer for layer in self.layers if isinstance(layer, KVPipeLayer)]

    def release_cut_windows(self) -> None:
        """Let the prompt go that transformers' sliding-window layers keep behind their window after a long
        forward (``runtime.window_layer.release_cut_storage``): values unchanged, memory freed."""
        for layer in self.layers:
            if type(layer) is DynamicSlidingWindowLayer:
                release_cut_storage(layer)

    def rebind(self, binding: Binding | None) -> None:
        """Let another attach (or none) drive this cache."""
        self.binding = binding
        for layer in self.compressed_layers:
            layer.binding = binding

    def fork(self) -> KVPipeCache:
        """A second cache holding the same tokens, driven by the same attach (if any), that can be extended,
        compressed or decoded apart from this one. Tensors are shared, not copied: nothing in a kvpipe cache is
        written in place (appends, compaction and flushes make new tensors), so a fork costs no memory until it
        diverges. A static tail is the exception (decode steps write into it): each fork gets its own copy."""
        twin = copy.copy(self)
        twin.layers = [_forked(layer) for layer in self.layers]
        return twin


def _forked(layer):
    """A layer's twin: sharing its tensors where nothing writes them in place (kvpipe's layers but their static
    tails; transformers' windows, which concatenate), a copy of states transformers updates in place."""
    if isinstance(layer, KVPipeLayer):
        twin = copy.copy(layer)
        if layer.static_tail is not None:
            twin._static = layer.static_tail.copy()
        return twin
    if isinstance(layer, DynamicLayer):
        return copy.copy(layer)
    return copy.deepcopy(layer)
