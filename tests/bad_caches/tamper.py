"""The bad-cache corpus: real saved caches, altered the ways an audit found that loaded silently or crashed.

``python tests/bad_caches/tamper.py FOLDER`` saves real caches of a small random model (a ragged store, packed
int4 pages, a decode-budget cache after decoding), writes one altered copy per case of ``CASES`` into ``FOLDER``,
then loads every copy with the pipeline it was saved with and prints one JSON line per file: the error's type and
message, the seconds it took; the last line gives the process's peak memory before and after the loads.
``tests/test_bad_caches.py`` runs it and checks that every file is refused, by a kvpipe error naming the field,
fast and without allocating what the file claims.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))            # conftest's tiny model

Edit = Callable[[dict, dict], object]           # (metadata, tensors) -> None (edited in place) or the file's bytes


def meta_json(key: str, change: Callable[[object], object]) -> Edit:
    def edit(metadata, tensors):
        metadata[key] = json.dumps(change(json.loads(metadata[key])))
    return edit


def every_layer(field: str, value) -> Edit:
    return meta_json("layers", lambda layers: [layer | {field: value} for layer in layers])


def set_meta(key: str, value: str | None) -> Edit:
    def edit(metadata, tensors):
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    return edit


def tensor(name: str, change: Callable[[torch.Tensor], torch.Tensor | None]) -> Edit:
    def edit(metadata, tensors):
        changed = change(tensors[name])
        if changed is None:
            del tensors[name]
        else:
            tensors[name] = changed
    return edit


def poisoned(value: float, at: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    def change(t):
        t = t.clone()
        t.view(-1)[at] = value
        return t
    return change


def raw(text: bytes) -> Edit:
    return lambda metadata, tensors: text


# name -> (source cache, edit, what the refusal must say: a regular expression)
CASES: dict[str, tuple[str, Edit, str]] = {
    "layers_empty_list": ("ragged", set_meta("layers", "[]"), r"layers: List should have at least 1 item"),
    "layers_empty_object": ("ragged", set_meta("layers", "{}"), r"layers: Input should be a valid list"),
    "layers_shorter": ("ragged", meta_json("layers", lambda layers: layers[:-1]),
                       r": layers: 1 entries for a model of 2"),
    "store_none": ("ragged", every_layer("store", "none"), r"layers.0.store.keys: not a tensor of this layer"),
    "store_none_quantized": ("quantized", every_layer("store", "none"), r"layers.0.page_counts: not a tensor"),
    "store_kind_swapped": ("quantized", every_layer("store", "ragged"), r"layers.0.store: ragged, where the attached"),
    "seen_huge": ("ragged", every_layer("seen", 10 ** 12), r"layers.0.seen: Input should be less than or equal"),
    "seen_negative": ("ragged", every_layer("seen", -5), r"layers.0.seen: Input should be greater than or equal"),
    "seen_fraction": ("ragged", every_layer("seen", 299.5), r"layers.0.seen: Input should be a valid integer"),
    "seen_beyond_positions": ("ragged", every_layer("seen", 5000), r"layers: seen=5000 is beyond the 1024 positions"),
    "seen_differs": ("ragged", meta_json("layers", lambda layers: [layers[0] | {"seen": layers[0]["seen"] + 1},
                                                                    *layers[1:]]), r"layers: the layers saw different"),
    "since_compression_negative": ("decode", every_layer("since_compression", -1e9),
                                   r"layers.0.since_compression: Input should be a valid integer"),
    "since_compression_below_tail": ("decode", every_layer("since_compression", 0), r"since_compression: 0 is not"),
    "nan_keys": ("ragged", tensor("layers.0.store.keys", poisoned(float("nan"))), r"store.keys: holds NaN"),
    "inf_values": ("ragged", tensor("layers.1.store.values", poisoned(float("inf"))), r"store.values: holds NaN"),
    "nan_tail": ("decode", tensor("layers.0.tail.keys", poisoned(float("nan"), at=0)), r"tail.keys: holds NaN"),
    "nan_scales": ("quantized", tensor("layers.0.pages.key_scale", poisoned(float("nan"))), r"key_scale: holds NaN"),
    "negative_scales": ("quantized", tensor("layers.0.pages.value_scale", poisoned(-1.0)), r"value_scale: holds neg"),
    "fp16_store": ("ragged", tensor("layers.0.store.keys", lambda t: t.half()), r"store.keys: dtype F16 where"),
    "fp16_tail": ("decode", tensor("layers.0.tail.values", lambda t: t.half()), r"tail.values: dtype F16 where"),
    "int64_tail": ("decode", tensor("layers.0.tail.keys", lambda t: t.long()), r"tail.keys: dtype I64 where"),
    "fp16_everything": ("ragged", lambda m, t: t.update({k: v.half() for k, v in t.items() if v.is_floating_point()}),
                        r"dtype F16 where"),
    "positions_shifted": ("ragged", tensor("layers.0.store.positions", lambda t: t + 1), r"positions outside 0\.\."),
    "positions_minus_one": ("ragged", tensor("layers.0.store.positions", poisoned(-1, at=5)), r"positions outside"),
    "positions_swapped": ("ragged", tensor("layers.0.store.positions", lambda t: t.flip(0)), r"do not increase"),
    "page_positions_shifted": ("quantized", tensor("layers.1.pages.positions", lambda t: torch.where(t >= 0, t + 7, t)),
                               r"pages.positions, residual.positions: positions outside"),
    "page_positions_minus_one": ("quantized", tensor("layers.0.pages.positions", poisoned(-1, at=0)),
                                 r"empty slots .-1. do not match"),
    "page_used_zero": ("quantized", tensor("layers.0.pages.used", torch.zeros_like), r"used: holds counts"),
    "head_dim_mismatch": ("ragged", tensor("layers.0.store.values", lambda t: t[:, :8].contiguous()),
                          r"store.values: shape \[\d+, 8\] does not fit"),
    "tail_keys_values_differ": ("decode", tensor("layers.0.tail.values", lambda t: t[:, :, :1].contiguous()),
                                r"tail.values: shape .* does not fit"),
    "batch_mismatch": ("ragged", tensor("layers.0.store.lengths", lambda t: t.repeat(2, 1)),
                       r"lengths: shape \[2, 2\]"),
    "lengths_huge": ("ragged", tensor("layers.0.store.lengths", lambda t: torch.full_like(t, 2 ** 24)),
                     r"store.lengths: per-head counts must be non-negative and sum"),
    "lengths_negative": ("ragged", tensor("layers.0.store.lengths", lambda t: t - 2 * t.max()), r"per-head counts"),
    "page_counts_huge": ("quantized", tensor("layers.0.page_counts", lambda t: torch.full_like(t, 2 ** 24)),
                         r"page_counts: per-head counts"),
    "missing_tensor": ("ragged", tensor("layers.1.store.positions", lambda t: None),
                       r"layers.1.store.positions: missing"),
    "extra_tensor": ("ragged", lambda m, t: t.update({"layers.5.store.keys": torch.ones(2, 2)}),
                     r"layers.5.store.keys: not a tensor of any layer"),
    "missing_shape": ("ragged", set_meta("shape", None), r": shape: Field required"),
    "missing_layers": ("ragged", set_meta("layers", None), r": layers: Field required"),
    "missing_compressed_by": ("ragged", set_meta("compressed_by", None), r"compressed_by: Field required"),
    "missing_identity": ("ragged", set_meta("model", None), r": model: Field required"),
    "unknown_field": ("ragged", set_meta("comment", "hello"), r"comment: Extra inputs are not permitted"),
    "invalid_json": ("ragged", set_meta("layers", "[{\"seen\": 96,"), r"layers: invalid JSON"),
    "deep_json": ("ragged", set_meta("layers", "[" * 100_000 + "]" * 100_000), r"layers: JSON nested deeper"),
    "huge_json": ("ragged", set_meta("compressed_by", "x" * (1 << 21)), r"compressed_by: String should have at most"),
    "empty_compressed_by": ("quantized", set_meta("compressed_by", ""), r"compressed_by: empty, but the layers"),
    "other_pipeline": ("quantized", meta_json("compressed_by", lambda spec: spec | {"name": "evil"}),
                       r"compressed_by: compressed by another pipeline"),
    "other_weights": ("ragged", meta_json("model", lambda m: m | {"fingerprint": "0" * 64}),
                      r"model.fingerprint: saved from a model with the same configuration but other weights"),
    "other_rope_theta": ("ragged", meta_json("model", lambda m: m | {"config": m["config"] | {
        "rope_parameters": {"rope_theta": 1.0, "rope_type": "default"}}}), r"model.config: saved from another model: "
                                                                            r"rope_parameters \{\"rope_theta\": 1.0"),
    "other_rank": ("ragged", set_meta("rank", "1"), r": rank: holds the heads of rank 1"),
    "format_2": ("ragged", set_meta("format", "kvpipe-cache/2"), r"format: saved by an earlier kvpipe"),
    "format_unknown": ("ragged", set_meta("format", "something"), r"format: 'something' is not a kvpipe cache"),
    "shape_dtype_wrong": ("ragged", meta_json("shape", lambda s: s | {"dtype": "float16"}), r"shape: .*dtype float16"),
    "not_safetensors": ("ragged", raw(b"not a cache at all"), r"not a readable kvpipe cache file"),
    "index_empty_shards": ("ragged", raw(b'{"format": "kvpipe-cache-index/2", "ranks": 2, "shards": []}'),
                           r"shards: List should have at least 2 items"),
    "index_integer_shards": ("ragged", raw(b'{"format": "kvpipe-cache-index/2", "ranks": 2, "shards": 7}'),
                             r"shards: Input should be a valid list"),
    "index_missing_ranks": ("ragged", raw(b'{"format": "kvpipe-cache-index/2", "shards": ["a", "b"]}'),
                            r"ranks: Field required"),
    "index_traversal": ("ragged", raw(b'{"format": "kvpipe-cache-index/2", "ranks": 2, "shards": ["../../x", "y"]}'),
                        r"ranks: saved by 2 tensor-parallel ranks"),
    "index_invalid_json": ("ragged", raw(b'{"format": '), r"index: invalid JSON"),
    "index_deep": ("ragged", raw(b"{" + b'"a":[' * 50_000), r"index: JSON nested deeper"),
}
PIPELINES = {"ragged": "streaming", "quantized": "int4", "decode": "decode-budget"}
CONTEXT = {"ragged": 96, "quantized": 300, "decode": 300}


def save_sources(folder: Path, model) -> dict[str, Path]:
    """One real saved cache per source kind, compressed by its shipped pipeline."""
    import kvpipe
    from kvpipe.models import cache_arg

    generator = torch.Generator().manual_seed(0)
    saved = {}
    for kind, pipeline in PIPELINES.items():
        with kvpipe.build(pipeline).attach(model) as handle, torch.inference_mode():
            cache = handle.cache()
            model(torch.randint(2, 250, (1, CONTEXT[kind]), generator=generator), **cache_arg(model, cache))
            for _ in range(40 if kind == "decode" else 0):         # a decode trigger counts these
                model(torch.randint(2, 250, (1, 1), generator=generator), **cache_arg(model, cache))
            saved[kind] = kvpipe.save_cache(cache, folder / f"source-{kind}.safetensors")
    return saved


def write_corpus(folder: Path, sources: dict[str, Path]) -> dict[str, Path]:
    written = {}
    for name, (source, edit, _) in CASES.items():
        with safe_open(str(sources[source]), "pt") as file:
            metadata, tensors = dict(file.metadata()), {key: file.get_tensor(key) for key in file.keys()}
        out = edit(metadata, tensors)
        path = folder / f"{name}.safetensors"
        if isinstance(out, bytes):
            path.write_bytes(out)
        else:
            save_file(tensors, str(path), metadata)
        written[name] = path
    return written


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024       # Linux reports KiB


def main(folder: Path) -> None:
    import kvpipe

    from conftest import tiny_model

    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model()
    corpus = write_corpus(folder, save_sources(folder, model))
    before = peak_bytes()
    for name, path in corpus.items():
        source = CASES[name][0]
        started = time.perf_counter()
        with kvpipe.build(PIPELINES[source]).attach(model):
            try:
                kvpipe.load_cache(path, model)
                error, message = None, "loaded"
            except Exception as err:        # noqa: BLE001 - reported, the test judges it
                error, message = [f"{k.__module__}.{k.__name__}" for k in type(err).__mro__], str(err)
        print(json.dumps({"case": name, "error": error, "message": message,
                          "seconds": time.perf_counter() - started}), flush=True)
    print(json.dumps({"peak_before": before, "peak_after": peak_bytes()}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
