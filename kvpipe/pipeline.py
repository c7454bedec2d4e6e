"""``kvpipe.build(spec)`` → ``Pipeline``; ``Pipeline.attach(model)`` → ``Handle``."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from kvpipe.attach import ForwardState, Handle
from kvpipe.context import CompressionContext, Observation
from kvpipe.graph import build_graph, describe, execution_order
from kvpipe.quantized_store import roundtrip
from kvpipe.spec import PipelineSpec, parse_spec
from kvpipe.store import RaggedStore
from kvpipe.yaml_source import read_source


def build(spec: str | Path | dict) -> Pipeline:
    """Validate a pipeline (a YAML path, a YAML string or a dict) and build its stage graph.

    Raises ``SpecError`` with file, line and key path on any mistake, before any model is touched.
    """
    source = read_source(spec)
    parsed = parse_spec(source)
    graph = build_graph(parsed, source)
    pipeline = Pipeline(parsed, graph, source.name)
    storing = [stage.id for stage in pipeline.stages if "store" in stage.writes]
    if len(storing) > 1:
        raise source.error(("stages",), f"stages {storing} all decide how the cache is stored; keep one")
    for stage in pipeline.stages:
        problem = stage.check_budget(parsed.budget) if parsed.budget is not None else None
        if problem:
            raise source.error(("budget",), problem)
    if parsed.budget is not None and not pipeline.evicts:
        raise source.error(("budget",), "no stage decides what to keep (topk, coupled_projection, ...), so this "
                                        "budget would be ignored and every token kept; add an eviction stage or "
                                        "remove the budget")
    return pipeline


class Pipeline:
    def __init__(self, spec: PipelineSpec, graph, source: str = "<dict>"):
        self.spec, self.graph, self.source = spec, graph, source
        self.stages = execution_order(graph)
        self.observers = [s for s in self.stages if s.observes]
        self.quantizer = next((s for s in self.stages if "store" in s.writes), None)
        ids = [s.id for s in self.stages]
        self.after_quantizer = set(ids[ids.index(self.quantizer.id) + 1:]) if self.quantizer else set()

    @property
    def evicts(self) -> bool:
        """Whether a stage decides what to keep, i.e. whether a budget applies."""
        return any("keep" in stage.writes for stage in self.stages)

    @property
    def compresses(self) -> bool:
        """Whether this pipeline changes the cache at all (a pipeline with no stages is a no-op)."""
        return bool(self.stages)

    def fires(self, cache, new_tokens: int) -> bool:
        """Whether the forward about to add ``new_tokens`` to ``cache`` ends with a compression."""
        if not self.compresses:
            return False
        trigger = self.spec.trigger
        pending = cache.layers[0].since_compression + new_tokens
        fresh = cache.get_seq_length() == 0
        return (fresh and trigger.prefill) or (trigger.every is not None and pending >= trigger.every)

    def attach(self, model: torch.nn.Module) -> Handle:
        """Make ``model.generate()`` and forward calls use this pipeline until ``handle.detach()``."""
        return Handle(self, model)

    def with_budget(self, **budget) -> Pipeline:
        """The same pipeline under another budget, e.g. ``pipeline.with_budget(keep=0.25)``."""
        data = self.spec.model_dump(mode="python", exclude_none=True)
        data["budget"] = budget
        return build(data)

    def describe(self) -> str:
        return describe(self.graph)

    def quantized_preview(self, obs: Observation) -> Observation:
        """``obs`` with keys and values as the quantized cache will return them (for observers after ``quantize``)."""
        batch, heads, kv, dim = obs.key.shape
        positions = torch.arange(kv, device=obs.key.device).expand(batch, heads, kv)
        keys, values = roundtrip(obs.key, obs.value, positions, obs.key_valid, self.quantizer.quantization(dim))
        return dataclasses.replace(obs, key=keys, value=values)

    def compress(self, forward: ForwardState) -> None:
        """Run every stage over all layers, then compact each layer to the kept set."""
        cache = forward.cache
        layers = cache.layers
        views = [layer.view(forward.padding) for layer in layers]
        head_dim, dtype = views[0].keys.shape[-1], views[0].keys.dtype
        seen = cache.get_seq_length()
        padding = forward.padding
        valid = views[0].valid
        seen_real = padding.sum(-1) if padding is not None else torch.full(valid.shape[:1], seen, device=valid.device)
        quant = self.quantizer.quantization(head_dim) if self.quantizer is not None else None
        if quant is not None:
            quant = dataclasses.replace(quant, backend=cache.kvpipe_session.backend)
        ctx = CompressionContext(
            layers=list(views), budget=self.spec.budget, seen_real=seen_real.long(),
            slot_bytes=quant.slot_bytes(head_dim) if quant else RaggedStore.slot_bytes(head_dim, dtype),
            full_slot_bytes=2 * head_dim * dtype.itemsize,
            overhead_bytes=quant.overhead_bytes(head_dim, dtype) if quant else 0.0, strict=self.spec.strict,
            observed_by={sid: [by_layer[i] for i in sorted(by_layer)] for sid, by_layer in forward.observed.items()})
        started = time.perf_counter()
        for stage in self.stages:
            stage(ctx)
            written = ctx.by_stage.get(stage.id, {})
            missing = [slot for slot in stage.writes if len(written.get(slot, ())) != len(views)]
            if missing:
                raise RuntimeError(f"stage {stage.id!r} did not write {missing} for every layer")
        # Compaction stores the original keys and values: what stages after `quantize` saw (ctx.layers) was
        # only a preview of the quantized cache, and quantizing twice would add error for nothing.
        keeps = ctx.slots.get("keep", [view.valid for view in views])
        values = ctx.slots.get("values", [view.values for view in views])        # refit values, if a stage did
        for layer, view, keep, value in zip(layers, views, keeps, values):
            layer.compact(dataclasses.replace(view, values=value), keep, quant)
        cache.compress_seconds += time.perf_counter() - started
        cache.budget_shortfall = ctx.shortfall

    def __repr__(self) -> str:
        return f"Pipeline({self.source}: {' -> '.join(s.id for s in self.stages) or 'no stages'}, budget {self.spec.budget})"
