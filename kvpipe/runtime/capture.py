"""Observe once, compress many: one prefill recorded, then any pipeline's compression applied to a fork of it.

A benchmark asks many pipelines the same case. Attached one by one, each re-runs the same prefill; the only
thing a pipeline adds to that forward is what its stages observe of attention, and that is a function of the
attention inputs alone. So ``capture`` runs the prefill once under a *recording* attach that keeps every layer's
``Observation`` (post-RoPE queries, keys, values, masks), and ``compressed`` gives each pipeline a fork of the
full cache compressed exactly as ``attach()`` would have compressed it at the end of that forward (tested: the
same kept positions and the same answers on the real model).

Probing stages (``reconstruction``) need the model once more after the prefill: ``compressed`` runs their probe
through the handle of the pipeline's attach, on a fork of the captured cache, and keeps the result in the
capture, so that every pipeline whose probing stage has the same parameters (the same pipeline at other
budgets, with or without quantization) shares one probe too.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from kvpipe.core.context import Observation
from kvpipe.core.plan import Plan, validated
from kvpipe.models import cache_arg
from kvpipe.runtime import compressor, probe
from kvpipe.runtime.attach import ForwardState, Handle, Session
from kvpipe.runtime.cache import KVPipeCache, cache_bytes

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class Capture:
    """One recorded prefill: the full cache it filled and what attention saw in every layer."""

    cache: KVPipeCache                  # uncompressed, stand-alone (fork it; never extend it)
    observations: list[Observation]     # per layer, in layer order
    padding: torch.Tensor | None        # the 2D mask ``[B, n]`` the prefill ran with
    prefill_seconds: float              # the recording forward (observation included)
    ids: torch.Tensor | None = None     # long [B, n]: what the prefill read (probes read it again)
    # probes run so far: (stage name, its parameters) -> ({layer: scores [B, Hkv, n]}, seconds the probe took)
    probes: dict[tuple[str, str], tuple[dict[int, torch.Tensor], float]] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.cache.get_seq_length()

    def fill(self, cache):
        """Put the captured keys and values into another transformers cache (``DynamicCache``,
        ``QuantizedCache``...) layer by layer, as the prefill's forward would have (it calls ``update`` with
        these very tensors); returns it."""
        with torch.inference_mode():
            for index, layer in enumerate(self.cache.layers):
                cache.update(layer.keys, layer.values, index)
        return cache


class RecordingSession(Session):
    """An attach that observes the first forward on a fresh cache for any pipeline and compresses nothing."""

    def __init__(self, pipeline: Plan, model: PreTrainedModel, tokenizer=None):
        super().__init__(pipeline, model, tokenizer)
        self.observations: dict[int, Observation] = {}

    def fires(self, cache: KVPipeCache, new_tokens: int) -> bool:
        return cache.get_seq_length() == 0

    def record(self, forward: ForwardState, obs: Observation) -> None:
        self.observations[obs.layer_idx] = obs

    def finish(self, forward: ForwardState) -> None:
        pass


def capture(model: PreTrainedModel, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            backend: str = "auto") -> Capture:
    """Prefill ``ids [B, n]`` once into a full kvpipe cache, recording every layer's attention inputs.

    ``backend`` must be the one the pipelines to compress run with (``auto``: as ``attach`` resolves it).
    """
    recorder = validated(Plan, {"version": 1, "backend": backend, "stages": []})
    with Handle(recorder, model, RecordingSession) as handle, torch.inference_mode():
        cache = handle.cache()
        started = time.perf_counter()
        model(ids, attention_mask=attention_mask, **cache_arg(model, cache))
        seconds = time.perf_counter() - started
        observations = cast(RecordingSession, handle.session).observations
    cache.rebind(None)
    cache.peak_bytes = cache_bytes(cache)
    return Capture(cache, [observations[i] for i in sorted(observations)], attention_mask, seconds, ids)


def compressed(pipeline: Plan, captured: Capture, handle: Handle | None = None) -> KVPipeCache:
    """A fork of ``captured``'s cache, compressed as ``pipeline.attach()`` compresses at the end of the same
    prefill (if its trigger fires then; otherwise the fork is returned full, as attach would leave it). Hand it
    to ``handle.take`` of an attach of ``pipeline`` to keep decoding with the pipeline's later triggers.
    ``handle``: that attach, needed (and the fork taken by it) when a stage probes the model after the prefill."""
    if pipeline.probers and (handle is None or handle.session.pipeline is not pipeline):
        raise ValueError(f"stages {[s.id for s in pipeline.probers]} probe the model after the prefill: pass the "
                         "handle of this pipeline's attach, compressed(pipeline, captured, handle)")
    cache = captured.cache.fork()
    if not pipeline.fires(0, 0, captured.tokens):
        return cache
    cache.compressing_forward_seconds += captured.prefill_seconds
    observed: compressor.Observed = {}
    with torch.inference_mode():
        for obs in captured.observations:
            for stage_id, value in compressor.observe(pipeline, obs).items():
                observed.setdefault(stage_id, {})[obs.layer_idx] = value
        if pipeline.probers:
            observed.update(probed(captured, handle, handle.take(cache)))
        compressor.compress(pipeline, cache, captured.padding, observed)
        for layer in cache.compressed_layers:
            layer.settle()
    return cache


def probed(captured: Capture, handle: Handle, cache: KVPipeCache) -> dict[str, dict[int, torch.Tensor]]:
    """The probing stages' scores on the captured prefill, ``{stage id: {layer: [B, Hkv, n]}}``, each probe run
    once per capture and stage parameters; ``cache`` (a fork of the capture's, driven by ``handle``) is
    charged the probe's seconds, as if it had run for it."""
    if captured.ids is None:
        raise ValueError("this capture did not keep its input ids, which probing stages read again")
    out = {}
    for stage in handle.session.pipeline.probers:
        key = (stage.name, json.dumps(stage.params.model_dump(), sort_keys=True))
        if key not in captured.probes:
            started = time.perf_counter()
            forward = ForwardState(cache, captured.padding, False, ids=captured.ids)
            scores = probe.run_stage(handle.session, forward, stage)
            captured.probes[key] = scores, time.perf_counter() - started
        out[stage.id], seconds = captured.probes[key]
        cache.probe_seconds += seconds
    return out
