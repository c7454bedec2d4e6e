"""The compressed part of one layer when a ``quantize`` stage is in the pipeline: packed pages plus a residual.

Per (row, KV head), the kept slots are stored as

* **pages** — ``PackedPages`` of ``G`` tokens each (KIVI layout, ``kvpipe.kernels.pages``), flat in
  (row, head, page) order with ``page_counts [B, Hkv]``; the last page a compaction makes may be partly used;
* a **residual** — a ``RaggedStore`` of the most recent tokens in the model's dtype (at most
  ``residual + G - 1`` per head between flushes).

New tokens arrive in the layer's uncompressed tail; ``append`` moves them in, flushing whole pages so that
at least ``residual`` recent tokens stay unquantized (KIVI's window). Nothing is ever padded in memory: a
head's bytes are its pages and its residual. ``padded()`` is the transient view attention and stages see
(pages dequantized, then the residual; unused page slots are invalid).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from kvpipe.core.plan import Plan
from kvpipe.core.quantization import Quantization
from kvpipe.errors import KVPipeError
from kvpipe.kernels.pages import PackedPages, dequantize_pages, dequantize_pages_into
from kvpipe.kernels.quant import check_finite
from kvpipe.kernels.ragged import concat_ragged, run_places, run_starts, scatter_runs, select_ragged_rows, unpack_ragged
from kvpipe.runtime.backend import packer
from kvpipe.runtime.page_packers import page_packer
from kvpipe.runtime.store import POSITION_DTYPE, RaggedStore, ValidSlots, storage_bytes


class Workspace:
    """One grow-only buffer shared by every layer of a model for its dequantized keys and values.

    Attention dequantizes a layer's pages each step; layers run one after another, so a single buffer the
    size of one layer serves them all, and the allocator (and the kernel's page-zeroing of fresh memory)
    is not paid 2 x layers times per token. Its bytes are working memory, like attention's own, not cache.
    """

    def __init__(self):
        self.buffer: torch.Tensor | None = None

    def pair(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        numel = 1
        for size in shape:
            numel *= size
        if self.buffer is None or self.buffer.numel() < 2 * numel or self.buffer.dtype != dtype \
                or self.buffer.device != device:
            self.buffer = torch.empty(2 * numel, dtype=dtype, device=device)
        return self.buffer[:numel].view(shape), self.buffer[numel:2 * numel].view(shape)

    @property
    def nbytes(self) -> int:
        return self.buffer.untyped_storage().nbytes() if self.buffer is not None else 0

    def __getstate__(self) -> dict:
        return {"buffer": None}         # scratch memory: a pickled or copied cache grows its own when it needs it


def stored_format(pipeline: Plan, head_dim: int, backend: str = "torch") -> Quantization | None:
    """How ``pipeline`` stores heads of ``head_dim`` channels, packed with ``backend``'s kernels (``None``: no
    storage stage, tokens kept as they are). The runtime stores ``Quantization`` formats; another is refused."""
    stage = pipeline.storage_stage
    if stage is None:
        return None
    fmt = stage.storage(head_dim)
    if not isinstance(fmt, Quantization):
        raise KVPipeError(f"stage {stage.id!r} stores in a {type(fmt).__name__}; kvpipe's caches store "
                          "kvpipe.core.quantization.Quantization formats")
    return dataclasses.replace(fmt, backend=backend)


def pack_pages(quant: Quantization, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> PackedPages:
    """Pages of ``keys``/``values [P, G, D]`` by the handler registered for ``quant``'s method and backend
    (``runtime.page_packers``); every handler gives the torch reference's bits (tested). A rotating format
    packs ``x R`` (``kernels.rotation``); ``dequantized`` turns it back."""
    rotation = quant.rotation(keys.shape[-1], keys.device)
    if rotation is not None:
        keys, values = keys.float() @ rotation, values.float() @ rotation
    return page_packer(quant.method, quant.backend, quant.fmt)(keys, values, positions, quant.fmt, quant.group_range)


def dequantized(pages: PackedPages, quant: Quantization, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys, values [P, G, D]`` of ``pages`` in ``dtype``, turned back from a rotating format's ``x R``."""
    keys, values = dequantize_pages(pages, quant.fmt, dtype)
    rotate_back_(quant, keys)
    rotate_back_(quant, values)
    return keys, values


def rotate_back_(quant: Quantization, tokens: torch.Tensor) -> None:
    """``tokens [..., D]`` dequantized from a rotating format, turned back in place (``x R Rᵀ = x``; fp32)."""
    rotation = quant.rotation(tokens.shape[-1], tokens.device)
    if rotation is not None:
        tokens.copy_(tokens.float() @ rotation.T)


@dataclass
class QuantizedStore(ValidSlots):
    pages: PackedPages
    page_counts: torch.Tensor         # int32 [B, Hkv]
    residual: RaggedStore
    quant: Quantization

    kind: ClassVar[str] = "quantized"
    fused_decode: ClassVar[bool] = True

    @property
    def tail_capacity(self) -> int:
        """A page: a full static tail is flushed into one (``runtime.tail``)."""
        return self.quant.fmt.group

    @property
    def joins_tail_at(self) -> int:
        """A plain tail is flushed once it holds a whole page (KIVI's flush)."""
        return self.quant.fmt.group

    # --- building --------------------------------------------------------------------------------
    @classmethod
    def from_padded(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
                    quant: Quantization) -> QuantizedStore:
        """Store the ``keep [B, Hkv, n]`` slots of ``keys``/``values [B, Hkv, n, D]``: all but the newest
        ``residual`` of each head go into pages (the last one possibly partly used)."""
        to_pages = (keep.sum(-1) - quant.residual).clamp_min(0)
        pages, counts, rest = _split(keys, values, positions, keep, to_pages, quant)
        return cls(pages, counts, rest, quant)

    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> QuantizedStore:
        """Add tokens ``keys``/``values [B, Hkv, T, D]`` at ``positions long [B, Hkv, T]`` (all real), flushing
        whole pages of the oldest unquantized tokens while more than ``residual`` would remain."""
        res_keys, res_values, res_positions = self.residual.padded()
        valid = torch.cat([self.residual.valid(), torch.ones_like(positions, dtype=torch.bool)], -1)
        keys, values = torch.cat([res_keys, keys], -2), torch.cat([res_values, values], -2)
        positions = torch.cat([res_positions, positions], -1)
        group = self.quant.fmt.group
        to_pages = (valid.sum(-1) - self.quant.residual).clamp_min(0) // group * group
        pages, counts, rest = _split(keys, values, positions, valid, to_pages, self.quant)
        merged = PackedPages(*(concat_ragged(old, self.page_counts, new, counts)
                               for old, new in zip(self.pages.tensors(), pages.tensors())))
        return QuantizedStore(merged, self.page_counts + counts, rest, self.quant)

    # --- the store contract shared with RaggedStore -------------------------------------------------
    # Attention and stages see a padded layout per head: its page slots, then its residual. When every head has
    # the same pages with the same slots used ("aligned": no eviction, or equal counts per head), the layout
    # skips the unused slots of partly used pages, so every slot is valid and attention needs no mask (a
    # mask costs SDPA twice the time on CPU). Otherwise each head's pages are laid out whole, holes masked.
    @cached_property
    def _runs(self) -> list[tuple[int, int, int]] | None:
        """Aligned stores: the pages of each head as runs ``(first, end, used slots of page end - 1)``, every
        page of a run full but the last. ``None`` when heads differ (in pages, used slots or residual length)."""
        if not (_same(self.page_counts) and _same(self.residual.lengths)):
            return None
        pages = int(self.page_counts.flatten()[0]) if self.page_counts.numel() else 0
        if pages == 0:
            return []
        used = self.pages.used.view(-1, pages)                                            # [B·Hkv, pages]
        if used.shape[0] and not bool((used == used[:1]).all()):
            return None
        runs, first, group = [], 0, self.quant.fmt.group
        for page, count in enumerate(used[0].tolist() if used.shape[0] else []):
            if count < group or page == pages - 1:
                runs.append((first, page + 1, count))
                first = page + 1
        return runs

    @cached_property
    def decode_operands(self):
        """What the fused decode kernel reads of this store, prepared for its launches once, not per step."""
        from kvpipe.kernels.triton_decode import decode_operands

        res = self.residual
        return decode_operands(self.pages, self.page_counts, self.quant.fmt, res.keys, res.values, res.lengths)

    @cached_property
    def page_width(self) -> int:                # a store never changes once built: computed once, not per step
        if self._runs is not None:
            return sum((end - first - 1) * self.quant.fmt.group + used for first, end, used in self._runs)
        return (int(self.page_counts.max()) if self.page_counts.numel() else 0) * self.quant.fmt.group

    @cached_property
    def _equal_heads(self) -> bool:
        """Aligned heads: every slot valid, pages dequantize straight into place."""
        return self._runs is not None

    @cached_property
    def width(self) -> int:
        """Padded width attention sees. Aligned heads: their page slots (see above), then the residual. Otherwise
        each head's tokens left-aligned (used page slots, then residual) up to the fullest head: never wider than
        the tokens seen, which transformers' mask offsets rely on (unused page slots are not laid out)."""
        if self._equal_heads:
            return self.page_width + self.residual.width
        return int(self.lengths.max()) if self.lengths.numel() else 0

    def _page_positions(self) -> torch.Tensor:
        """``long [B, Hkv, pages·G]``: every page slot of each head, -1 where none is stored."""
        return unpack_ragged(self.pages.positions.long(), self.page_counts, fill=-1)[0].flatten(2)

    def _holey_positions(self, residual_positions: torch.Tensor) -> torch.Tensor:
        """``long [B, Hkv, pages·G + residual]``: every page slot then the residual, -1 where none is stored."""
        return torch.cat([self._page_positions(), residual_positions], -1)

    def _build_valid(self) -> torch.Tensor:
        if self._equal_heads:
            return torch.ones((*self.page_counts.shape, self.width), dtype=torch.bool, device=self.page_counts.device)
        return torch.arange(self.width, device=self.page_counts.device) < self.lengths[..., None]

    @cached_property
    def lengths(self) -> torch.Tensor:
        """``long [B, Hkv]``: tokens stored per head."""
        return (self._holey_positions(self.residual.padded()[2]) >= 0).sum(-1)

    def padded(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Transient ``keys, values [B, Hkv, width, D]`` (pages dequantized; in ``dtype``, default the residual's)
        and ``positions long`` (-1 = empty)."""
        res = self.residual
        dtype = dtype or res.keys.dtype
        if self._equal_heads:
            res_keys, res_values, res_positions = res.padded()
            keys, values = self.attend(res_keys[..., :0, :].to(dtype), res_values[..., :0, :].to(dtype))
            pages = self._page_positions()
            pages = pages[..., pages[0, 0] >= 0] if pages.shape[0] * pages.shape[1] else pages[..., :0]
            return keys, values, torch.cat([pages, res_positions], -1)
        page_keys, page_values = dequantized(self.pages, self.quant, dtype)
        places = self._destinations()
        return (self._laid_out(page_keys, res.keys.to(dtype), places),
                self._laid_out(page_values, res.values.to(dtype), places),
                self._laid_out(self.pages.positions.long(), res.positions.long(), places, fill=-1))

    @cached_property
    def _page_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Heads not aligned: what the left-aligned layout needs, held per page and per head, not per slot: each
        page's head (row·Hkv + head) and the place of its first slot in that head's run (``int32 [P]`` each), each
        head's used page slots (``int32 [B·Hkv]``), and the used page slots in all (found once: one host sync)."""
        used = self.pages.used.long()
        runs, _ = run_places(self.page_counts, self.pages.count)
        before = used.cumsum(0) - used                                                 # used slots of earlier pages
        starts = before - before[run_starts(self.page_counts).long()[runs]]            # minus those of the head's
        per_head = torch.zeros(self.page_counts.numel(), dtype=torch.long, device=used.device).index_add_(0, runs, used)
        return runs.to(torch.int32), starts.to(torch.int32), per_head.to(torch.int32), int(used.sum())

    def _destinations(self) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
        """Heads not aligned: where each stored token goes in the left-aligned layout ``[B·Hkv, width]``, worked out
        once per layout from ``_page_layout`` (no host sync; 24 bytes a token held would cost a third of an int4
        token of 64 channels). Returns the used slots of the flat pages ``long [M]``, their ``(row·Hkv + head,
        place)``, and the residual rows' ``(row·Hkv + head, place)``."""
        runs, starts, per_head, total = self._page_layout
        group = self.quant.fmt.group
        slots = torch.arange(group, device=runs.device) < self.pages.used[:, None]                       # [P, G]
        used = slots.flatten().nonzero_static(size=total).squeeze(1)   # per head: its used page slots in page order
        page = used // group
        page_places = (runs[page].long(), starts[page].long() + used % group)
        return used, page_places, run_places(self.residual.lengths, self.residual.keys.shape[0], per_head)

    def _laid_out(self, pages: torch.Tensor, residual: torch.Tensor, places, fill: float = 0,
                  tail: torch.Tensor | None = None) -> torch.Tensor:
        """Heads not aligned: ``pages [P, G, *rest]`` (dequantized, or positions) and the residual ``[N, *rest]``
        -> ``[B, Hkv, width (+ T), *rest]``, each head's tokens left-aligned at ``places`` (``_destinations()``),
        ``fill`` after them, then ``tail``."""
        used, page_places, residual_places = places
        return scatter_runs(self.page_counts.shape, self.width,
                            [(residual_places, residual), (page_places, pages.flatten(0, 1)[used].to(residual.dtype))],
                            fill, tail)

    def attend(self, tail_keys: torch.Tensor, tail_values: torch.Tensor,
               workspace: Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads, ``keys``/``values [B, Hkv, width + T, D]``: the padded store, then the tail
        ``[B, Hkv, T, D]``. When heads are aligned, pages are dequantized straight into one buffer, taken
        from ``workspace`` if given (valid until the next call: layers attend one after another)."""
        if not self._equal_heads:
            page_keys, page_values = dequantized(self.pages, self.quant, tail_keys.dtype)
            res, places = self.residual, self._destinations()
            return (self._laid_out(page_keys, res.keys.to(tail_keys.dtype), places, tail=tail_keys),
                    self._laid_out(page_values, res.values.to(tail_keys.dtype), places, tail=tail_values))
        batch, heads, tail, dim = tail_keys.shape
        pages, residual, group = self.page_width, self.residual.width, self.quant.fmt.group
        shape = (batch, heads, pages + residual + tail, dim)
        keys, values = (workspace.pair(shape, tail_keys.dtype, tail_keys.device) if workspace is not None
                        else (tail_keys.new_empty(shape), tail_keys.new_empty(shape)))
        at = 0
        for full, full_pages, used, partial_page in self._run_pages:
            if full:
                split = (batch, heads, full, group, dim)
                dequantize_pages_into(full_pages, self.quant.fmt, keys[:, :, at:at + full * group].view(split),
                                      values[:, :, at:at + full * group].view(split))
                for out in (keys, values):
                    rotate_back_(self.quant, out[:, :, at:at + full * group])
                at += full * group
            if partial_page is not None:       # a partly used page: its used slots only, through a page buffer
                page_keys, page_values = dequantized(partial_page, self.quant, tail_keys.dtype)
                keys[:, :, at:at + used] = page_keys.view(batch, heads, group, dim)[:, :, :used]
                values[:, :, at:at + used] = page_values.view(batch, heads, group, dim)[:, :, :used]
                at += used
        for out, kept, new in ((keys, self.residual.keys, tail_keys), (values, self.residual.values, tail_values)):
            out[:, :, pages:pages + residual] = kept.view(batch, heads, residual, dim)
            out[:, :, pages + residual:] = new
        return keys, values

    @cached_property
    def _run_pages(self) -> list[tuple[int, PackedPages, int, PackedPages | None]]:
        """Per run of an aligned store: ``(full pages per head, those pages, used slots of the partly used
        page, that page or None)``, as views ``[B·Hkv, (pages,) ...]`` made once (dequantization takes the
        leading dims as they come, no copy)."""
        per_head, group = int(self.page_counts.flatten()[0]) if self.page_counts.numel() else 0, self.quant.fmt.group

        def head_pages(index):
            return self.pages.map(lambda t: t.view(-1, per_head, *t.shape[1:])[:, index])

        out = []
        for first, end, used in self._runs:
            full = end - first - (used < group)
            out.append((full, head_pages(slice(first, first + full)), used,
                        head_pages(end - 1) if used < group else None))
        return out

    def select_rows(self, index: torch.Tensor) -> QuantizedStore:
        pages = self.pages.map(lambda t: select_ragged_rows(t, self.page_counts, index))
        return QuantizedStore(pages, self.page_counts[index], self.residual.select_rows(index), self.quant)

    @cached_property                 # read after every forward (the cache's peak); a store never changes
    def nbytes(self) -> int:
        return storage_bytes(*self.pages.tensors(), self.page_counts) + self.residual.nbytes

    def analytic_bytes(self) -> int:
        """What the format says these tokens cost: pages·page_bytes + residual slots + length arrays."""
        head_dim = self.residual.keys.shape[-1]
        slot = RaggedStore.slot_bytes(head_dim, self.residual.keys.dtype)
        return (self.pages.count * self.quant.fmt.page_bytes(head_dim) + int(self.residual.lengths.sum()) * slot
                + 4 * (self.page_counts.numel() + self.residual.lengths.numel()))


def _same(lengths: torch.Tensor) -> bool:
    return lengths.numel() == 0 or bool((lengths == lengths.flatten()[0]).all())


def _page_slots(keep: torch.Tensor, to_pages: torch.Tensor, group: int):
    """Where the first ``to_pages [B, Hkv]`` kept slots of each head go: ``(into_pages bool [B, Hkv, n],
    page long [N], slot long [N], counts [B, Hkv])``, ``N = into_pages.sum()``, heads' pages in (row, head) order."""
    rank = keep.long().cumsum(-1) - 1
    into_pages = keep & (rank < to_pages[..., None])
    counts = (to_pages + group - 1) // group
    first_page = counts.flatten().cumsum(0) - counts.flatten()                      # exclusive, per head
    head = torch.arange(counts.numel(), device=keep.device).view_as(counts)[..., None].expand_as(keep)
    slot_rank = rank[into_pages]
    return into_pages, first_page[head[into_pages]] + slot_rank // group, slot_rank % group, counts


def _quantize_slots(keys, values, positions, into_pages, page, slot, pages: int, quant: Quantization) -> PackedPages:
    check_finite(keys[into_pages], "keys", quant.fmt.scale_dtype)
    check_finite(values[into_pages], "values", quant.fmt.scale_dtype)
    group, dim = quant.fmt.group, keys.shape[-1]
    page_keys = keys.new_zeros(pages, group, dim)
    page_values = values.new_zeros(pages, group, dim)
    page_positions = torch.full((pages, group), -1, dtype=POSITION_DTYPE, device=keys.device)
    page_keys[page, slot] = keys[into_pages]
    page_values[page, slot] = values[into_pages]
    page_positions[page, slot] = positions[into_pages].to(POSITION_DTYPE)
    return pack_pages(quant, page_keys, page_values, page_positions)


def _split(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor,
           to_pages: torch.Tensor, quant: Quantization) -> tuple[PackedPages, torch.Tensor, RaggedStore]:
    """The first ``to_pages [B, Hkv]`` kept slots of each head as pages; the other kept slots as a residual."""
    into_pages, page, slot, counts = _page_slots(keep, to_pages, quant.fmt.group)
    pages = _quantize_slots(keys, values, positions, into_pages, page, slot, int(counts.sum()), quant)
    rest = RaggedStore.from_padded(keys, values, positions, keep & ~into_pages, packer(quant.backend))
    return pages, counts.to(POSITION_DTYPE), rest


def roundtrip(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
              quant: Quantization) -> tuple[torch.Tensor, torch.Tensor]:
    """``keys``/``values [B, Hkv, n, D]`` as the cache would return them after quantizing the ``valid`` slots
    (same slots, same order): what stages placed after a ``quantize`` stage see."""
    to_pages = (valid.sum(-1) - quant.residual).clamp_min(0)
    into_pages, page, slot, counts = _page_slots(valid, to_pages, quant.fmt.group)
    pages = _quantize_slots(keys, values, positions, into_pages, page, slot, int(counts.sum()), quant)
    page_keys, page_values = dequantized(pages, quant, keys.dtype)
    keys, values = keys.clone(), values.clone()
    keys[into_pages], values[into_pages] = page_keys[page, slot], page_values[page, slot]
    return keys, values
