"""Base classes for the stage shapes that repeat, so that a stage writes only its per-layer step.

* ``ObservingScorer``: its scores are what it observed inside attention;
* ``ProbingScorer``: its scores are what it observed while the model re-read its context (a probe forward);
* ``CandidateStage``: refines each layer's upstream ``candidates`` (``refine``);
* ``EvictionStage``: keeps, per head, the protected slots and then its choice among the eligible ones, up to the
  allocation (``select``); a prompt shorter than the protected set is handled once, here;
* ``StorageStage``: decides how the kept tokens are stored (``storage``); at most one per pipeline.
"""
from __future__ import annotations

from typing import Protocol

import torch

from kvpipe.core.context import Candidates, CompressionContext, LayerView
from kvpipe.core.registry import P, Stage


class ObservingScorer(Stage[P]):
    """A scorer whose scores are exactly what ``observe`` returned per layer (``float [B, Hkv, kv]``)."""

    writes = ("scores",)
    observes = True

    def __call__(self, ctx: CompressionContext) -> None:
        ctx.write(self, "scores", ctx.observed(self))


class ProbingScorer(ObservingScorer[P]):
    """A scorer that observes a **probe**: after the compressing forward, the runtime feeds ``prompt_ids`` and
    then that forward's tokens again to a copy of the cache, ``chunk`` tokens per forward, and calls ``observe``
    on every layer's attention in each of them (queries: the probe tokens; keys: every cached slot, then the
    probe tokens so far). The runtime keeps the first ``n`` keys' values (the slots being compressed) and takes
    the element-wise maximum over the probe's forwards; the copy is then dropped."""

    probes = True

    @property
    def chunk(self) -> int:  # pragma: no cover - interface
        """Probe tokens per forward: bounds the probe's attention memory."""
        raise NotImplementedError

    def prompt_ids(self, tokenizer) -> list[int]:  # pragma: no cover - interface
        """Token ids fed before the context is read again (``tokenizer`` may be None when none are needed)."""
        raise NotImplementedError

    def after_probe(self, scores: torch.Tensor) -> torch.Tensor:
        """The layer's observed maximum over the probe, ``[B, Hkv, n]`` (the compressed slots only), turned into
        its scores; by default as is."""
        return scores


class CandidateStage(Stage[P]):
    """Refines the ``candidates`` of every layer (without an upstream candidate stage: nothing protected, every
    valid slot eligible). Observing subclasses get what they observed of the layer."""

    optional_reads = ("candidates",)
    writes = ("candidates",)

    def refine(self, ctx: CompressionContext, view: LayerView, upstream: Candidates, observed) -> Candidates:
        """One layer's new candidates; ``observed`` is ``observe``'s result for the layer, or None."""
        raise NotImplementedError  # pragma: no cover - interface

    def __call__(self, ctx: CompressionContext) -> None:
        observed = ctx.observed(self) if self.observes else [None] * len(ctx.layers)
        ctx.write(self, "candidates", [self.refine(ctx, view, upstream, seen) for view, upstream, seen
                                       in zip(ctx.layers, ctx.candidates(self), observed)])


class EvictionStage(Stage[P]):
    """Decides what every layer keeps from its ``scores``, its ``allocation`` and its candidates."""

    reads = ("scores", "allocation")
    optional_reads = ("candidates",)
    writes = ("keep",)

    def select(self, scores: torch.Tensor, k: torch.Tensor, eligible: torch.Tensor,
               protected: torch.Tensor) -> torch.Tensor:
        """``keep bool [B, H, n]``: ``protected`` (``⊆ eligible``) and ``k [B, H]`` slots in all per head, chosen
        among ``eligible`` by ``scores [B, H, n]``; ``k`` already covers the protected slots."""
        raise NotImplementedError  # pragma: no cover - interface

    def __call__(self, ctx: CompressionContext) -> None:
        keep = []
        for layer, (view, scores, k, candidates) in enumerate(
                zip(ctx.layers, ctx.read(self, "scores"), ctx.read(self, "allocation"), ctx.candidates(self))):
            protected = candidates.protected & view.valid
            keep.append(self.select(scores, within_budget(ctx, layer, protected, k), view.valid & candidates.eligible,
                                    protected))
        ctx.write(self, "keep", keep)


def within_budget(ctx: CompressionContext, layer: int, protected: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The allocation ``k [B, H]``, raised where a head's ``protected`` slots (``bool [B, H, n]``) exceed it: a
    prompt shorter than the protected window keeps them all (``ctx.over_budget`` reports or, strict, refuses)."""
    need = protected.sum(-1)
    short = (need - k).clamp_min(0)
    if bool((short > 0).any()):
        ctx.over_budget(f"layer {layer}: the budget keeps {int(k.min())} slots per head but {int(need.max())} are "
                        "protected (sinks + recent window, recovered evidence); the prompt is too short for this "
                        "budget. Raise the budget or protect less", int(short.sum()))
    return torch.maximum(k, need)


class StorageFormat(Protocol):
    """How kept tokens are stored (``kvpipe.core.quantization.Quantization`` is one): what a token costs. What a
    store of the format gives back is the runtime's to say (``CompressionContext.preview``)."""

    def slot_bytes(self, head_dim: int) -> float: ...

    def overhead_bytes(self, head_dim: int, dtype: torch.dtype) -> float: ...


class StorageStage(Stage[P]):
    """Decides how the kept tokens are stored. Without one, a cache keeps them as they are, in the model's dtype.

    One path for both orders: the compressor stores the kept **original** tokens once, in this format, after
    every stage has run; stages placed after this one see (and observe) the keys and values as the store will
    return them, so "quantize first, evict on quantized values" and "evict, then quantize" differ only in the
    YAML order."""

    def storage(self, head_dim: int) -> StorageFormat:
        """The format for heads of ``head_dim`` channels."""
        raise NotImplementedError  # pragma: no cover - interface

    def __call__(self, ctx: CompressionContext) -> None:
        fmt = self.storage(ctx.layers[0].keys.shape[-1])
        if ctx.preview is None:
            raise RuntimeError("a storage stage runs inside a compression that knows how stores give tokens back "
                               "(kvpipe.runtime.compressor.compress sets CompressionContext.preview)")
        ctx.layers = [LayerView(*ctx.preview(view.keys, view.values, view.positions, view.valid, fmt),
                                view.positions, view.valid) for view in ctx.layers]
