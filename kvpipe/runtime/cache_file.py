"""Compressed caches on disk: one safetensors file, no pickle.

A context compressed once can be saved and asked questions later, in another process. The file holds, per
layer, the uncompressed tail and the store (kept keys/values and their positions and per-head lengths, or the
packed pages, page counts and the residual), and as metadata the tokens seen, the model's shape and identity
(``runtime.model_identity``) and the pipeline the cache was compressed with. Loading needs **that** model with
**that** pipeline attached: the store's format (bits, groups, range method) and later compressions come from it.

A file is untrusted input. Loading checks the metadata against a bounded schema (``runtime.cache_meta``), then the
tensors' names, dtypes and shapes from the header before anything is allocated, then their values
(``runtime.cache_tensors``); another model, another pipeline or an altered file is refused with a
``FileError`` naming the file and the field.

Under tensor parallelism each rank saves its own heads to ``<stem>.rank<r>-of-<n>.safetensors`` beside ``path``
(the file records its rank), and rank 0 writes ``path`` itself as a small JSON index naming them; loading reads
the index and each rank its own file (the same number of ranks is needed). Ranks agree on the outcome: when one
rank's part fails, every rank raises.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kvpipe.core.untrusted import MAX_JSON_CHARS, tensor_header
from kvpipe.errors import FileError, KVPipeError, UnsupportedModelError
from kvpipe.kernels.pages import PackedPages
from kvpipe.runtime.adapters import kv_shape
from kvpipe.runtime.cache import KVPipeCache, KVPipeLayer
from kvpipe.runtime.cache_meta import FORMAT, INDEX, CacheMeta, parse_cache_meta, parse_index
from kvpipe.runtime.cache_tensors import PAGES, RAGGED, check_header, check_values, layer_patterns
from kvpipe.runtime.model_identity import config_differences
from kvpipe.runtime.quantized_store import QuantizedStore, stored_format
from kvpipe.runtime.store import RaggedStore

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def save_cache(cache: KVPipeCache, path: str | Path) -> Path:
    """Write ``cache`` (a kvpipe cache, compressed or not, of the model attached now) to ``path`` as safetensors;
    returns the path. Under tensor parallelism every rank calls it: each writes its shard, rank 0 the index."""
    if not isinstance(cache, KVPipeCache):
        raise KVPipeError(f"save_cache writes kvpipe caches; this is a {type(cache).__name__}")
    binding = cache.binding
    if binding is None or not binding.attached:
        raise UnsupportedModelError("save_cache needs the cache's model with its pipeline attached: the file records "
                                    "which model filled the cache; save it before detach()")
    path, shards = Path(path), cache.shards
    names = [_shard_path(path, rank, shards.world).name for rank in range(shards.world)]
    own = path.with_name(names[shards.rank]) if shards.split else path
    with shards.agreeing(f"saving the cache to {path}"):
        _save_file(cache, own, binding.identity)
        if shards.split and shards.rank == 0:
            _write(path, lambda: path.write_text(json.dumps({"format": INDEX, "ranks": shards.world, "shards": names})))
    return path


def _shard_path(path: Path, rank: int, world: int) -> Path:
    return path.with_name(f"{path.stem}.rank{rank}-of-{world}{path.suffix or '.safetensors'}")


def _write(path: Path, write) -> None:
    try:
        write()
    except (OSError, SafetensorError) as err:
        raise KVPipeError(f"{path}: cannot write the cache there ({err})") from None


def _save_file(cache: KVPipeCache, path: Path, identity: dict) -> None:
    if len(cache.compressed_layers) != len(cache.layers):
        raise KVPipeError("this cache has sliding-window or linear-attention layers beside kvpipe's; the cache file "
                          "format (kvpipe-cache/3) holds full-attention layers only, so it cannot be saved yet. "
                          "Keep it in memory (cache.fork() shares it)")
    layers = [layer for layer in cache.compressed_layers if layer.is_initialized]
    if len(layers) != len(cache.layers):
        raise KVPipeError("this cache holds no tokens yet (or not in every layer); prefill it before saving")
    tensors, described = {}, []
    for index, layer in enumerate(layers):
        prefix = f"layers.{index}"
        tensors[f"{prefix}.tail.keys"], tensors[f"{prefix}.tail.values"] = layer.keys, layer.values
        store = layer.store
        kind = "none" if store is None else store.kind
        if isinstance(store, RaggedStore):
            tensors |= _named(f"{prefix}.store", store, RAGGED)
        elif isinstance(store, QuantizedStore):
            tensors |= _named(f"{prefix}.pages", store.pages, PAGES)
            tensors[f"{prefix}.page_counts"] = store.page_counts
            tensors |= _named(f"{prefix}.residual", store.residual, RAGGED)
        described.append({"seen": layer.seen, "since_compression": layer.since_compression, "store": kind})
    batch, kv_heads, _, head_dim = layers[0].keys.shape
    shape = {"layers": len(layers), "batch": batch, "kv_heads": kv_heads, "head_dim": head_dim,
             "dtype": str(layers[0].keys.dtype).removeprefix("torch.")}
    metadata = {"format": FORMAT, "rank": str(cache.shards.rank), "world": str(cache.shards.world),
                "shape": json.dumps(shape), "model": json.dumps(identity), "layers": json.dumps(described),
                "compressed_by": cache.compressed_by or "", "backend": cache.storage.backend}
    # to the host, each tensor its own copy: safetensors refuses views that share a storage
    host = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    _write(path, lambda: save_file(host, str(path), metadata))


def load_cache(path: str | Path, model: PreTrainedModel) -> KVPipeCache:
    """The cache saved at ``path``, driven by the pipeline attached to ``model`` (the model that filled it, with
    the pipeline it was compressed with). Each layer's tensors go to the device of that layer of the model."""
    session = getattr(model, "_kvpipe_session", None)
    if session is None:
        raise UnsupportedModelError("load_cache needs a model with a kvpipe pipeline attached (the one the cache "
                                    "was compressed with): kvpipe.build(pipeline).attach(model), then load_cache")
    if session.layout.mixed:
        raise UnsupportedModelError(f"{type(model).__name__} has sliding-window or linear-attention layers, which the "
                                    "cache file format (kvpipe-cache/3) does not hold; no file can be loaded into it")
    with session.shards.agreeing(f"loading the cache {path}"):
        cache = _load_file(_own_file(Path(path), session.shards), model, session)
    session.last_cache = cache
    return cache


def _load_file(path: Path, model: PreTrainedModel, session) -> KVPipeCache:
    try:
        with safe_open(str(path), "pt") as file:
            meta = parse_cache_meta(path, file.metadata() or {})
            _check_rank(path, meta, session.shards)
            _check_model(path, meta, model, session)
            fmt = _check_pipeline(path, meta, session.pipeline)
            header = tensor_header(file)
            patterns = [layer_patterns(meta, layer, fmt) for layer in meta.layers]
            for index, layer_patterns_ in enumerate(patterns):
                check_header(path, index, header, layer_patterns_)
            known = {f"layers.{index}.{name}" for index, names in enumerate(patterns) for name in names}
            if unknown := sorted(header.keys() - known):
                raise FileError(path, unknown[0], "not a tensor of any layer; the file was altered")
            cache = session.new_cache()
            decoder_layers = session.decoder.layers
            for index, (layer, described) in enumerate(zip(cache.layers, meta.layers)):
                own = {name: file.get_tensor(f"layers.{index}.{name}") for name in patterns[index]}
                check_values(path, index, described, own, fmt)
                device = next(decoder_layers[index].parameters()).device
                _restore(layer, {name: t.to(device) for name, t in own.items()}, described, session.pipeline)
    except (OSError, SafetensorError) as err:
        raise FileError(path, "", f"not a readable kvpipe cache file ({err})") from None
    cache.compressed_by = meta.compressed_by or None
    return cache


def _own_file(path: Path, shards) -> Path:
    """The file this process reads: ``path`` itself, or its rank's shard when ``path`` is an index."""
    try:
        with open(path, "rb") as file:
            # a safetensors file starts with its header's 8-byte length, an index with its JSON (read bounded)
            start = file.read(1)
            start += file.read(MAX_JSON_CHARS) if start == b"{" else b""
    except OSError as err:
        raise FileError(path, "", f"cannot read it ({err})") from None
    if not start.startswith(b"{"):
        if shards.split:
            raise FileError(path, "", f"holds a cache saved by one process; this model is split over "
                                           f"{shards.world} tensor-parallel ranks: load it into the model loaded "
                                           "without tp_plan")
        return path
    try:
        index = parse_index(path, start.decode())
    except UnicodeDecodeError as err:
        raise FileError(path, "", f"neither a kvpipe cache file nor its index ({err})") from None
    if index.ranks != shards.world:
        raise FileError(path, "ranks", f"saved by {index.ranks} tensor-parallel ranks and this model is split "
                                            f"over {shards.world}; load it with {index.ranks} ranks")
    expected = [_shard_path(path, rank, index.ranks).name for rank in range(index.ranks)]
    if index.shards != expected:
        raise FileError(path, "shards", f"names {index.shards[:4]}, where kvpipe writes {expected[:4]}")
    return path.with_name(expected[shards.rank])


def _named(prefix: str, holder, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": getattr(holder, name) for name in names}


def _check_rank(path: Path, meta: CacheMeta, shards) -> None:
    if (meta.rank, meta.world) != (shards.rank, shards.world):
        raise FileError(path, "rank", f"holds the heads of rank {meta.rank} of {meta.world}; this process is "
                                           f"rank {shards.rank} of {shards.world}")


def _check_model(path: Path, meta: CacheMeta, model: PreTrainedModel, session) -> None:
    """The attached model is the one that filled the cache: the same shape, configuration and weights."""
    kv_heads, head_dim = kv_shape(model)
    here = {"layers": len(session.decoder.layers), "kv_heads": kv_heads // session.shards.world,  # a rank's share
            "head_dim": head_dim, "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    saved = meta.shape.model_dump()
    if differ := [f"{key} {saved[key]} (this model: {here[key]})" for key in here if saved[key] != here[key]]:
        raise UnsupportedModelError(f"{path}: shape: saved from a model of another shape: " + ", ".join(differ))
    if len(meta.layers) != meta.shape.layers:
        raise FileError(path, "layers", f"{len(meta.layers)} entries for a model of {meta.shape.layers} layers")
    here = session.binding.identity
    if differ := config_differences(meta.model.config, here["config"]):
        raise UnsupportedModelError(f"{path}: model.config: saved from another model: " + ", ".join(differ))
    if meta.model.fingerprint != here["fingerprint"]:
        raise UnsupportedModelError(f"{path}: model.fingerprint: saved from a model with the same configuration but "
                                    "other weights; load it into the model that filled it")
    if len({layer.seen for layer in meta.layers}) != 1:
        raise FileError(path, "layers", "the layers saw different numbers of tokens")
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and meta.layers[0].seen > positions:
        raise FileError(path, "layers", f"seen={meta.layers[0].seen} is beyond the {positions} positions of "
                                             "this model")


def _check_pipeline(path: Path, meta: CacheMeta, pipeline):
    """The attached pipeline is the one that compressed the cache; returns its page format (``None``: no
    quantization)."""
    compressed = any(layer.store != "none" for layer in meta.layers)
    if compressed and not meta.compressed_by:
        raise FileError(path, "compressed_by", "empty, but the layers hold compressed stores")
    if meta.compressed_by and meta.compressed_by != pipeline.spec.model_dump_json():
        raise KVPipeError(f"{path}: compressed_by: compressed by another pipeline than the attached one "
                          f"({pipeline.source}); attach the pipeline it was saved with: {meta.compressed_by[:2000]}")
    stored = "quantized" if pipeline.storage_stage is not None else "ragged"
    if wrong := [index for index, layer in enumerate(meta.layers) if layer.store not in ("none", stored)]:
        raise FileError(path, f"layers.{wrong[0]}.store", f"{meta.layers[wrong[0]].store}, where the attached "
                                                               f"pipeline stores {stored}")
    if pipeline.storage_stage is None:
        return None
    return stored_format(pipeline, meta.shape.head_dim).fmt


def _restore(layer: KVPipeLayer, tensors: dict[str, torch.Tensor], described, pipeline) -> None:
    keys, values = tensors["tail.keys"], tensors["tail.values"]
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    layer.seen, layer.since_compression = described.seen, described.since_compression
    if described.store == "ragged":
        layer.store = RaggedStore(*(tensors[f"store.{name}"] for name in RAGGED))
    elif described.store == "quantized":
        quant = stored_format(pipeline, keys.shape[-1], layer.storage.backend)
        layer.store = QuantizedStore(PackedPages(*(tensors[f"pages.{name}"] for name in PAGES)),
                                     tensors["page_counts"], RaggedStore(*(tensors[f"residual.{n}"] for n in RAGGED)),
                                     quant)
