"""What a cache file says about itself: its metadata, parsed with bounds, by a versioned pydantic schema.

A cache file (``runtime.cache_file``) is untrusted input: it may come from another machine, another model or an
attacker. Its metadata is JSON inside the safetensors header, so it is bounded in size and nesting **before** it
is parsed, then validated field by field: every number has a range, every list its length, nothing unknown is
accepted. A refusal is a ``FileError`` naming the file and the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from kvpipe.core.spec import MAX_TOKENS, StrictModel
from kvpipe.core.untrusted import bounded_json, validated
from kvpipe.errors import FileError

FORMAT = "kvpipe-cache/3"
INDEX = "kvpipe-cache-index/2"
MAX_LAYERS = 1024
MAX_RANKS = 1024


class LayerMeta(StrictModel):
    seen: int = Field(ge=1, le=MAX_TOKENS, description="tokens fed to this layer")
    since_compression: int = Field(ge=0, le=MAX_TOKENS, description="tokens fed since its last compression")
    store: Literal["none", "ragged", "quantized"]


class ShapeMeta(StrictModel):
    layers: int = Field(ge=1, le=MAX_LAYERS)
    batch: int = Field(ge=1, le=MAX_TOKENS)
    kv_heads: int = Field(ge=1, le=4096, description="KV heads this file holds (a tensor-parallel rank's share)")
    head_dim: int = Field(ge=1, le=4096)
    dtype: Literal["float32", "float16", "bfloat16"]


class IdentityMeta(StrictModel):
    """Which model filled the cache: its configuration (what shapes its keys and values) and a fingerprint of its
    weights (``runtime.model_identity``)."""

    config: dict[str, object]
    fingerprint: str = Field(pattern=r"^[0-9a-f]{64}$")


class CacheMeta(StrictModel):
    format: Literal["kvpipe-cache/3"]
    rank: int = Field(ge=0, lt=MAX_RANKS)
    world: int = Field(ge=1, le=MAX_RANKS)
    shape: ShapeMeta
    model: IdentityMeta
    layers: list[LayerMeta] = Field(min_length=1, max_length=MAX_LAYERS)
    compressed_by: str = Field(max_length=1 << 16, description="the pipeline's spec (JSON); '' = never compressed")
    backend: Literal["torch", "triton"]


class IndexMeta(StrictModel):
    """The index rank 0 writes at the cache's path under tensor parallelism: one shard file per rank."""

    format: Literal["kvpipe-cache-index/2"]
    ranks: int = Field(ge=2, le=MAX_RANKS)
    shards: list[str] = Field(min_length=2, max_length=MAX_RANKS)


def parse_cache_meta(path: Path | str, metadata: dict[str, str]) -> CacheMeta:
    """The safetensors header's string metadata (``shape``, ``model`` and ``layers`` hold JSON) validated."""
    if metadata.get("format") in ("kvpipe-cache/1", "kvpipe-cache/2"):
        raise FileError(path, "format", f"saved by an earlier kvpipe ({metadata['format']}), which recorded "
                                             "no model identity; this version reads "
                                             f"{FORMAT} only: compress the context again and save it anew")
    if metadata.get("format") != FORMAT:
        raise FileError(path, "format", f"{metadata.get('format')!r} is not a kvpipe cache (expected {FORMAT!r})")
    fields: dict[str, object] = dict(metadata)
    for name in ("rank", "world", "shape", "model", "layers"):
        if name in metadata:
            fields[name] = bounded_json(path, name, metadata[name])
    return validated(path, CacheMeta, fields)


def parse_index(path: Path | str, text: str) -> IndexMeta:
    return validated(path, IndexMeta, bounded_json(path, "index", text))
