"""The plan: a validated pipeline (spec, stage graph in execution order, budget, triggers) and no runtime state.

``kvpipe.runtime.pipeline.Pipeline`` is the plan that can run (``attach``); ``kvpipe.runtime.compressor`` runs one
compression of it over a cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Self, TypeVar

from kvpipe.core.graph import build_graph, describe, execution_order
from kvpipe.core.spec import PipelineSpec, parse_spec
from kvpipe.core.stage_bases import ProbingScorer, StorageStage
from kvpipe.core.yaml_source import read_source

PlanT = TypeVar("PlanT", bound="Plan")


def validated(cls: type[PlanT], spec: str | Path | dict) -> PlanT:
    """A ``cls`` from a pipeline (a YAML path, a YAML string or a dict), its stage graph built.

    Raises ``SpecError`` with file, line and key path on any mistake, before any model is touched.
    """
    source = read_source(spec)
    parsed = parse_spec(source)
    graph = build_graph(parsed, source)
    pipeline = cls(parsed, graph, source.name)
    storing = [stage.id for stage in pipeline.stages if isinstance(stage, StorageStage)]
    if len(storing) > 1:
        raise source.error(("stages",), f"stages {storing} all decide how the cache is stored; keep one")
    for stage in pipeline.stages:
        problem = stage.check_budget(parsed.budget) if parsed.budget is not None else None
        if problem:
            raise source.error(("budget",), problem)
    if parsed.layers.sliding == "quantize" and pipeline.storage_stage is None:
        raise source.error(("layers", "sliding"), "quantize needs a quantize stage, whose format the windows take; "
                                                  "add one or write keep")
    if parsed.budget is not None and not pipeline.evicts:
        raise source.error(("budget",), "no stage decides what to keep (topk, coupled_projection, ...), so this "
                                        "budget would be ignored and every token kept; add an eviction stage or "
                                        "remove the budget")
    return pipeline


class Plan:
    def __init__(self, spec: PipelineSpec, graph, source: str = "<dict>"):
        self.spec, self.graph, self.source = spec, graph, source
        self.stages = execution_order(graph)
        self.observers = [s for s in self.stages if s.observes and not s.probes]   # of the compressing forward
        self.probers = [s for s in self.stages if isinstance(s, ProbingScorer)]    # of a probe forward after it
        self.storage_stage = next((s for s in self.stages if isinstance(s, StorageStage)), None)
        ids = [s.id for s in self.stages]
        # stages that see the cache as its storage returns it
        self.after_storage = set(ids[ids.index(self.storage_stage.id) + 1:]) if self.storage_stage else set()

    @property
    def evicts(self) -> bool:
        """Whether a stage decides what to keep, i.e. whether a budget applies."""
        return any("keep" in stage.writes for stage in self.stages)

    @property
    def compresses(self) -> bool:
        """Whether this pipeline changes the cache at all (a pipeline with no stages is a no-op)."""
        return bool(self.stages)

    def fires(self, seen: int, since_compression: int, new_tokens: int) -> bool:
        """Whether a forward adding ``new_tokens`` to a cache that has seen ``seen`` tokens, ``since_compression``
        of them since its last compression, ends with a compression."""
        if not self.compresses:
            return False
        trigger = self.spec.trigger
        pending = since_compression + new_tokens
        return (seen == 0 and trigger.prefill) or (trigger.every is not None and pending >= trigger.every)

    def with_budget(self, **budget) -> Self:
        """The same pipeline under another budget, e.g. ``pipeline.with_budget(keep=0.25)``."""
        data = self.spec.model_dump(mode="python", exclude_none=True)
        data["budget"] = budget
        return validated(type(self), data)

    def describe(self) -> str:
        return describe(self.graph)

    def __repr__(self) -> str:
        stages = " -> ".join(s.id for s in self.stages) or "no stages"
        return f"{type(self).__name__}({self.source}: {stages}, budget {self.spec.budget})"
