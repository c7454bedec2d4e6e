"""Compressed caches on disk: one safetensors file, no pickle.

A context compressed once can be saved and asked questions later, in another process. The file holds, per
layer, the uncompressed tail and the store (kept keys/values and their positions and per-head lengths, or the
packed pages, page counts and the residual), and as metadata the tokens seen, the model's shape and the
pipeline the cache was compressed with. Loading needs the model with **that** pipeline attached: the store's
format (bits, groups, range method) and later compressions come from it; a model of another shape or another
pipeline is refused with the difference named.

Under tensor parallelism each rank saves its own heads to ``<stem>.rank<r>-of-<n>.safetensors`` beside ``path``,
and rank 0 writes ``path`` itself as a small JSON index naming them; loading reads the index and each rank its
own file (the same number of ranks is needed).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kvpipe.errors import KVPipeError, UnsupportedModelError
from kvpipe.kernels.pages import PackedPages
from kvpipe.runtime.adapters import kv_shape
from kvpipe.runtime.cache import KVPipeCache, KVPipeLayer
from kvpipe.runtime.quantized_store import QuantizedStore
from kvpipe.runtime.store import RaggedStore

# 2: page layout 2 (codes in bytes, split order, a used-slot count per page; kernels.pages). Files of format 1 hold
# KIVI's int32 words, which this version does not read: they are refused with what to do.
FORMAT = "kvpipe-cache/2"
INDEX = "kvpipe-cache-index/1"
RAGGED = ("keys", "values", "positions", "lengths")
PAGES = tuple(field.name for field in dataclasses.fields(PackedPages))


def save_cache(cache: KVPipeCache, path: str | Path) -> Path:
    """Write ``cache`` (a kvpipe cache, compressed or not) to ``path`` as safetensors; returns the path.
    Under tensor parallelism every rank calls it: each writes its shard, rank 0 the index at ``path``."""
    if not isinstance(cache, KVPipeCache):
        raise KVPipeError(f"save_cache writes kvpipe caches; this is a {type(cache).__name__}")
    path, shards = Path(path), cache.shards
    if not shards.split:
        return _save_file(cache, path)
    names = [_shard_path(path, rank, shards.world).name for rank in range(shards.world)]
    _save_file(cache, path.with_name(names[shards.rank]))
    if shards.rank == 0:
        path.write_text(json.dumps({"format": INDEX, "ranks": shards.world, "shards": names}))
    shards.barrier()                                # every shard is on disk when save_cache returns
    return path


def _shard_path(path: Path, rank: int, world: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix or '.safetensors'}")


def _save_file(cache: KVPipeCache, path: Path) -> Path:
    layers = [layer for layer in cache.layers if layer.is_initialized]
    if len(layers) != len(cache.layers):
        raise KVPipeError("this cache holds no tokens yet (or not in every layer); prefill it before saving")
    tensors, described = {}, []
    for index, layer in enumerate(layers):
        prefix = f"layers.{index}"
        tensors[f"{prefix}.tail.keys"], tensors[f"{prefix}.tail.values"] = layer.keys, layer.values
        kind = _store_kind(layer.store)
        if kind == "ragged":
            tensors |= _named(f"{prefix}.store", layer.store, RAGGED)
        elif kind == "quantized":
            tensors |= _named(f"{prefix}.pages", layer.store.pages, PAGES)
            tensors[f"{prefix}.page_counts"] = layer.store.page_counts
            tensors |= _named(f"{prefix}.residual", layer.store.residual, RAGGED)
        described.append({"seen": layer.seen, "since_compression": layer.since_compression, "store": kind})
    first = layers[0].keys
    metadata = {"format": FORMAT, "layers": json.dumps(described), "compressed_by": cache.compressed_by or "",
                "shape": json.dumps(_shape(len(layers), first.shape[1], first.shape[-1], first.dtype)),
                "backend": cache.storage.backend}
    # to the host, each tensor its own copy: safetensors refuses views that share a storage
    save_file({name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}, str(path),
              metadata)
    return path


def load_cache(path: str | Path, model: torch.nn.Module) -> KVPipeCache:
    """The cache saved at ``path``, driven by the pipeline attached to ``model`` (attach the pipeline the cache
    was compressed with first). Each layer's tensors go to the device of that layer of the model."""
    session = getattr(model, "_kvpipe_session", None)
    if session is None:
        raise UnsupportedModelError("load_cache needs a model with a kvpipe pipeline attached (the one the cache "
                                    "was compressed with): kvpipe.build(pipeline).attach(model), then load_cache")
    path = _own_file(Path(path), session.shards)
    try:
        with safe_open(str(path), "pt") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except (OSError, SafetensorError, ValueError) as err:
        raise KVPipeError(f"{path}: not a readable kvpipe cache file ({err})") from None
    if metadata.get("format") == "kvpipe-cache/1":
        raise KVPipeError(f"{path} was saved by an earlier kvpipe (cache format 1, quantized pages in the old packed "
                          f"layout); this version reads format 2 only: compress the context again and save it anew")
    if metadata.get("format") != FORMAT:
        raise KVPipeError(f"{path}: not a kvpipe cache file (format {metadata.get('format')!r}, expected {FORMAT!r})")
    _check_model(path, json.loads(metadata["shape"]), model, session)
    _check_pipeline(path, metadata["compressed_by"], session.pipeline)
    cache = session.new_cache()
    decoder_layers = session.decoder.layers
    for index, (layer, described) in enumerate(zip(cache.layers, json.loads(metadata["layers"]))):
        device = next(decoder_layers[index].parameters()).device
        prefix = f"layers.{index}."
        own = {name.removeprefix(prefix): t.to(device) for name, t in tensors.items() if name.startswith(prefix)}
        _restore(layer, own, described, session.pipeline)
    cache.compressed_by = metadata["compressed_by"] or None
    session.last_cache = cache
    return cache


def _own_file(path: Path, shards) -> Path:
    """The file this process reads: ``path`` itself, or its rank's shard when ``path`` is an index."""
    try:
        with open(path, "rb") as file:
            is_index = file.read(1) == b"{"       # a safetensors file starts with its header's 8-byte length
    except OSError as err:
        raise KVPipeError(f"{path}: cannot read it ({err})") from None
    if not is_index:
        if shards.split:
            raise KVPipeError(f"{path} holds a cache saved by one process; this model is split over {shards.world} "
                              "tensor-parallel ranks: load it into the model loaded without tp_plan")
        return path
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KVPipeError(f"{path}: neither a kvpipe cache file nor its index ({err})") from None
    if index.get("format") != INDEX:
        raise KVPipeError(f"{path}: not a kvpipe cache index (format {index.get('format')!r}, expected {INDEX!r})")
    if index["ranks"] != shards.world:
        raise KVPipeError(f"{path} was saved by {index['ranks']} tensor-parallel ranks and this model is split over "
                          f"{shards.world}; load it with {index['ranks']} ranks")
    return path.with_name(index["shards"][shards.rank])


def _store_kind(store) -> str:
    if store is None:
        return "none"
    return store.kind


def _named(prefix: str, holder, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": getattr(holder, name) for name in names}


def _shape(layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> dict:
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch.")}


def _check_model(path: Path, saved: dict, model: torch.nn.Module, session) -> None:
    kv_heads, head_dim = kv_shape(model)
    dtype = next(model.parameters()).dtype
    # a tensor-parallel rank holds (and saved) its share of the heads
    here = _shape(len(session.decoder.layers), kv_heads // session.shards.world, head_dim, dtype)
    differ = [f"{key} {saved[key]} (this model: {here[key]})" for key in here if saved.get(key) != here[key]]
    if differ:
        raise UnsupportedModelError(f"{path} was saved from a model of another shape: " + ", ".join(differ))


def _check_pipeline(path: Path, saved: str, pipeline) -> None:
    if saved and saved != pipeline.spec.model_dump_json():
        raise KVPipeError(f"{path} was compressed by another pipeline than the attached one ({pipeline.source}); "
                          f"attach the pipeline it was saved with: {saved}")


def _restore(layer: KVPipeLayer, tensors: dict[str, torch.Tensor], described: dict, pipeline) -> None:
    keys, values = tensors["tail.keys"], tensors["tail.values"]
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    layer.seen, layer.since_compression = described["seen"], described["since_compression"]
    if described["store"] == "ragged":
        layer.store = RaggedStore(*(tensors[f"store.{name}"] for name in RAGGED))
    elif described["store"] == "quantized":
        quant = dataclasses.replace(pipeline.storage_stage.storage(keys.shape[-1]), backend=layer.storage.backend)
        layer.store = QuantizedStore(PackedPages(*(tensors[f"pages.{name}"] for name in PAGES)),
                                     tensors["page_counts"], RaggedStore(*(tensors[f"residual.{n}"] for n in RAGGED)),
                                     quant)
