"""One compression: a pipeline (the plan) run over a cache's layers. No model and no attach needed.

``attach()`` calls these from its hooks: ``observe`` inside attention while the compressing forward runs,
``compress`` after it. A cache captured earlier (``KVPipeCache`` filled through ``update``) can be compressed the
same way, with the observations recorded when it was filled when the pipeline's stages observe.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from kvpipe.core.context import CompressionContext, Observation
from kvpipe.core.plan import Plan
from kvpipe.core.spec import Budget
from kvpipe.runtime.cache import KVPipeCache, KVPipeLayer, layer_bytes
from kvpipe.runtime.quantized_store import roundtrip, stored_format
from kvpipe.runtime.stats import uncompressed_bytes
from kvpipe.runtime.store import RaggedStore, storage_bytes

# what observing stages recorded in the forward that filled a cache: {stage id: {layer index: value}}
Observed = dict[str, dict[int, Any]]


def observe(pipeline: Plan, obs: Observation) -> dict[str, Any]:
    """What each observing stage records of one layer's attention: ``{stage id: value}``. Stages after the
    storage stage see the keys and values as the store will return them."""
    previewed = None
    recorded = {}
    for stage in pipeline.observers:
        if stage.id in pipeline.after_storage:
            previewed = previewed or stored_preview(pipeline, obs)
            recorded[stage.id] = stage.observe(previewed)
        else:
            recorded[stage.id] = stage.observe(obs)
    return recorded


def stored_preview(pipeline: Plan, obs: Observation) -> Observation:
    """``obs`` with keys and values as the pipeline's storage will return them."""
    batch, heads, kv, dim = obs.key.shape
    positions = torch.arange(kv, device=obs.key.device).expand(batch, heads, kv)
    keys, values = roundtrip(obs.key, obs.value, positions, obs.key_valid, stored_format(pipeline, dim))
    return dataclasses.replace(obs, key=keys, value=values)


@torch.no_grad()
def compress(pipeline: Plan, cache: KVPipeCache, padding: torch.Tensor | None = None,
             observed: Observed | None = None) -> None:
    """Run every stage of ``pipeline`` over all layers of ``cache``, then compact each layer to the kept set
    (quantized when the pipeline stores so, with the cache's own backend). Adds to ``cache.compress_seconds`` and
    sets ``cache.budget_shortfall``.

    Args:
        padding: the 2D mask ``[B, seen]`` (1 = real token) the cache was filled with; ``None``: no padding.
        observed: what the pipeline's observing stages recorded while the cache was filled (``observe`` per
            layer); required when a stage observes.
    """
    observed = observed or {}
    missing = [stage.id for stage in (*pipeline.observers, *pipeline.probers)
               if len(observed.get(stage.id, ())) != len(cache.compressed_layers)]
    if missing:
        raise ValueError(f"stages {missing} observe the queries of the forward that filled the cache (or of a probe "
                         "after it), and no observation of every layer was given; record them with "
                         "kvpipe.runtime.compressor.observe or kvpipe.runtime.probe (attach() does) or use a "
                         "pipeline whose stages need none")
    layers = cache.compressed_layers
    views = [layer.view(padding) for layer in layers]
    head_dim, dtype = views[0].keys.shape[-1], views[0].keys.dtype
    valid = views[0].valid
    seen_real = (padding.sum(-1) if padding is not None
                 else torch.full(valid.shape[:1], cache.get_seq_length(), device=valid.device))
    fmt = stored_format(pipeline, head_dim, cache.storage.backend)               # packed with the cache's kernels
    ctx = CompressionContext(
        layers=list(views), budget=whole_model_budget(pipeline.spec.budget, cache), seen_real=seen_real.long(),
        slot_bytes=fmt.slot_bytes(head_dim) if fmt else RaggedStore.slot_bytes(head_dim, dtype),
        full_slot_bytes=2 * head_dim * dtype.itemsize,
        overhead_bytes=fmt.overhead_bytes(head_dim, dtype) if fmt else 0.0, strict=pipeline.spec.strict,
        observed_by={sid: [by_layer[i] for i in sorted(by_layer)] for sid, by_layer in observed.items()},
        shards=cache.shards, preview=roundtrip)
    started, sent = time.perf_counter(), cache.shards.sent_bytes
    for stage in pipeline.stages:
        stage(ctx)
        written = ctx.by_stage.get(stage.id, {})
        unwritten = [slot for slot in stage.writes if len(written.get(slot, ())) != len(views)]
        if unwritten:
            raise RuntimeError(f"stage {stage.id!r} did not write {unwritten} for every layer")
    # Compaction stores the original keys and values: what stages after the storage stage saw (ctx.layers) was
    # only a preview of the store, and quantizing twice would add error for nothing.
    keeps = ctx.slots.get("keep", [view.valid for view in views])
    values = ctx.slots.get("values", [view.values for view in views])        # refit values, if a stage did
    wholes = [(layer.keys, layer.values) if layer.store is None else None for layer in layers]
    for layer, view, keep, value in zip(layers, views, keeps, values):
        layer.compact(dataclasses.replace(view, values=value), keep, fmt)
    _keep_whole_what_saved_nothing(cache, wholes)
    cache.compress_seconds += time.perf_counter() - started
    cache.collective_bytes += cache.shards.sent_bytes - sent
    cache.budget_shortfall = ctx.shortfall
    cache.compressed_by = pipeline.spec.model_dump_json()     # what a saved cache must be loaded under


def _keep_whole_what_saved_nothing(cache: KVPipeCache, wholes: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
    """A cache compressed for the first time whose stores hold no fewer bytes than its tokens did (a short prompt:
    every token protected, or pages, scales and positions outweighing what was evicted) goes back to what it was,
    so a cache is never larger than the full one. Decided for the whole model (every layer, summed over
    tensor-parallel ranks): transformers builds one attention mask for all layers, which must agree on whether
    they are compressed, and every rank decides alike. ``cache.layers_kept_whole`` counts the layers kept."""
    cache.layers_kept_whole = 0
    if any(whole is None for whole in wholes):           # compressed before: compressing again only shrinks it
        return
    layers = cache.compressed_layers
    sizes = torch.tensor([sum(layer.nbytes for layer in layers), sum(storage_bytes(*w) for w in wholes)],
                         dtype=torch.float64, device=wholes[0][0].device)     # gloo reduces on the host, nccl not
    stored, whole = cache.shards.sum(sizes).tolist()
    if stored >= whole:
        for layer, (keys, values) in zip(layers, wholes):
            layer.store = None
            layer.keys, layer.values = keys, values
        cache.layers_kept_whole = len(layers)


def whole_model_budget(budget: Budget | None, cache: KVPipeCache) -> Budget | None:
    """``budget`` for the compressed layers. ``keep`` and ``tokens`` apply to them as written; ``bytes`` is a fraction
    of the whole model's cache as transformers would hold it (windows and states included), so the compressed
    layers get what the others leave: ``(bytes · whole − others) / compressed`` of their own full bytes (at least
    one part in a million: what cannot be met is a shortfall, reported as for any budget)."""
    others = [layer for layer in cache.layers if not isinstance(layer, KVPipeLayer)]
    if budget is None or budget.kind != "bytes" or not others:
        return budget
    (compressed_full, _), (others_full, _) = uncompressed_bytes(cache.compressed_layers), uncompressed_bytes(others)
    share = (budget.bytes * (compressed_full + others_full) - sum(layer_bytes(layer) for layer in others)) \
        / max(compressed_full, 1)
    return Budget(bytes=min(max(share, 1e-6), 1.0))
