"""The tensors of one layer of a cache file, checked before they become a cache.

Two passes, both refusing with a ``FileError`` that names the file and the tensor:

* ``check_header`` — names, dtypes and shapes, read from the safetensors header (nothing is allocated): exactly
  the tensors the layer's store kind needs, in the model's dtype or the pipeline's page format, with sizes that
  agree with each other and with the metadata;
* ``check_values`` — once loaded (on the host; at most the file's own bytes): every float finite, scales not
  negative, per-head lengths summing to the stored slots, every head's positions strictly increasing below the
  tail's first position, a page's used slots first.

A file that passes both builds a cache that attention can read: no index out of range, no allocation beyond
what the file holds, no NaN reaching ``generate()``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from kvpipe.core.quantization import POSITION_DTYPE
from kvpipe.errors import FileError
from kvpipe.kernels.pages import PageFormat
from kvpipe.kernels.ragged import run_places
from kvpipe.runtime.cache_meta import CacheMeta, LayerMeta

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}
RAGGED = ("keys", "values", "positions", "lengths")
PAGES = ("key_codes", "key_scale", "key_min", "value_codes", "value_scale", "value_min", "positions", "used")

Header = dict[str, tuple[str, tuple[int, ...]]]       # tensor name -> (safetensors dtype name, shape)
Pattern = tuple[torch.dtype, tuple[int | str, ...]]    # a dtype and a shape whose strings are sizes to agree on


def layer_patterns(meta: CacheMeta, layer: LayerMeta, fmt: PageFormat | None) -> dict[str, Pattern]:
    """What one layer's tensors must look like (names without the ``layers.<i>.`` prefix)."""
    shape = meta.shape
    dtype, batch, heads, dim = getattr(torch, shape.dtype), shape.batch, shape.kv_heads, shape.head_dim
    patterns: dict[str, Pattern] = {"tail.keys": (dtype, (batch, heads, "T", dim)),
                                    "tail.values": (dtype, (batch, heads, "T", dim))}

    def ragged(prefix: str, slots: str) -> dict[str, Pattern]:
        return {f"{prefix}.keys": (dtype, (slots, dim)), f"{prefix}.values": (dtype, (slots, dim)),
                f"{prefix}.positions": (POSITION_DTYPE, (slots,)),
                f"{prefix}.lengths": (POSITION_DTYPE, (batch, heads))}

    if layer.store == "ragged":
        patterns |= ragged("store", "N")
    elif layer.store == "quantized":
        group, scales = fmt.group, fmt.scale_dtype
        patterns |= {"pages.key_codes": (torch.uint8, ("P", group, dim * fmt.key_bits // 8)),
                     "pages.key_scale": (scales, ("P", dim)), "pages.key_min": (scales, ("P", dim)),
                     "pages.value_codes": (torch.uint8, ("P", dim, group * fmt.value_bits // 8)),
                     "pages.value_scale": (scales, ("P", group, dim // fmt.value_group)),
                     "pages.value_min": (scales, ("P", group, dim // fmt.value_group)),
                     "pages.positions": (POSITION_DTYPE, ("P", group)), "pages.used": (POSITION_DTYPE, ("P",)),
                     "page_counts": (POSITION_DTYPE, (batch, heads))} | ragged("residual", "R")
    return patterns


def check_header(path: Path, index: int, header: Header, patterns: dict[str, Pattern]) -> dict[str, int]:
    """Check layer ``index``'s entries of ``header`` against ``patterns``; returns the sizes the strings stand for."""
    prefix = f"layers.{index}."
    present = {name.removeprefix(prefix) for name in header if name.startswith(prefix)}
    missing, extra = sorted(patterns.keys() - present), sorted(present - patterns.keys())
    if missing:
        raise FileError(path, prefix + missing[0], "missing (the layer's metadata says it is stored)")
    if extra:
        raise FileError(path, prefix + extra[0], "not a tensor of this layer's store; the file was altered")
    sizes: dict[str, int] = {}
    for name, (dtype, pattern) in patterns.items():
        kind, shape = header[prefix + name]
        if SAFETENSORS_DTYPES.get(kind) != dtype:
            raise FileError(path, prefix + name, f"dtype {kind} where this model and pipeline need "
                                                      f"{str(dtype).removeprefix('torch.')}")
        if len(shape) != len(pattern):
            raise FileError(path, prefix + name, f"shape {list(shape)} where {len(pattern)} dimensions are needed")
        for got, want in zip(shape, pattern):
            want = sizes.setdefault(want, got) if isinstance(want, str) else want
            if got != want:
                expected = [sizes.get(p, p) if isinstance(p, str) else p for p in pattern]
                raise FileError(path, prefix + name, f"shape {list(shape)} does not fit the metadata and the other "
                                                          f"tensors (expected {expected})")
    return sizes


def check_values(path: Path, index: int, layer: LayerMeta, tensors: dict[str, torch.Tensor],
                 fmt: PageFormat | None) -> None:
    """Check one layer's loaded tensors (names without prefix) for what shapes cannot show."""
    prefix = f"layers.{index}."
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise FileError(path, prefix + name, "holds NaN or infinite values")
    tail = tensors["tail.keys"].shape[2]
    stored_below = layer.seen - tail                  # every stored position comes before the tail's tokens
    if layer.store == "none":
        if tail != layer.seen:
            raise FileError(path, prefix + "tail.keys", f"an uncompressed layer holds every token it saw; this "
                                                        f"one holds {tail} of seen={layer.seen}")
        return
    if not tail <= layer.since_compression <= layer.seen:
        raise FileError(path, prefix + "since_compression", f"{layer.since_compression} is not between the tail's "
                                                                 f"{tail} tokens and seen={layer.seen}")
    if layer.store == "ragged":
        heads = _run_heads(path, prefix + "store.lengths", tensors["store.lengths"], len(tensors["store.positions"]))
        _check_positions(path, prefix + "store.positions", heads, tensors["store.positions"], stored_below)
        return
    used, positions, group = tensors["pages.used"], tensors["pages.positions"], fmt.group
    for name in ("pages.key_scale", "pages.value_scale"):
        if bool((tensors[name] < 0).any()):
            raise FileError(path, prefix + name, "holds negative scales")
    if bool(((used < 1) | (used > group)).any()):
        raise FileError(path, prefix + "pages.used", f"holds counts outside 1..{group}")
    first_slots = torch.arange(group) < used[:, None]                       # [P, G]: the used slots come first
    if not bool(((positions >= 0) == first_slots).all()):
        raise FileError(path, prefix + "pages.positions", "empty slots (-1) do not match the pages' used counts")
    page_heads = _run_heads(path, prefix + "page_counts", tensors["page_counts"], len(used))
    residual_heads = _run_heads(path, prefix + "residual.lengths", tensors["residual.lengths"],
                                len(tensors["residual.positions"]))
    slot_heads = page_heads[:, None].expand(-1, group)[first_slots]
    # per head: its page slots in page order, then its residual (a stable sort by head keeps that order)
    heads = torch.cat([slot_heads, residual_heads])
    order = torch.sort(heads, stable=True).indices
    _check_positions(path, prefix + "pages.positions, residual.positions", heads[order],
                     torch.cat([positions[first_slots], tensors["residual.positions"]])[order], stored_below)


def _run_heads(path: Path, field: str, lengths: torch.Tensor, total: int) -> torch.Tensor:
    """``long [total]``: the (row·Hkv + head) of each entry of a flat run ``lengths [B, Hkv]`` describes."""
    if bool((lengths < 0).any()) or int(lengths.sum()) != total:
        raise FileError(path, field, f"per-head counts must be non-negative and sum to the {total} stored")
    return run_places(lengths, total)[0]


def _check_positions(path: Path, field: str, heads: torch.Tensor, positions: torch.Tensor, below: int) -> None:
    """Positions grouped by ``heads`` must lie in ``[0, below)`` and increase strictly within each head."""
    if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= below):
        raise FileError(path, field, f"positions outside 0..{below - 1} (the tokens before the tail)")
    same_head = heads[1:] == heads[:-1]
    if bool((positions[1:] <= positions[:-1])[same_head].any()):
        raise FileError(path, field, "positions do not increase within a head")
