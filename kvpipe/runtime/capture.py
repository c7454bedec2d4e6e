"""Observe once, compress many: one prefill recorded, then any pipeline's compression applied to a fork of it.

A benchmark asks many pipelines the same case. Attached one by one, each re-runs the same prefill; the only
thing a pipeline adds to that forward is what its stages observe of attention, and that is a function of the
attention inputs alone. So ``capture`` runs the prefill once under a *recording* attach that keeps every layer's
``Observation`` (post-RoPE queries, keys, values, masks), and ``compressed`` gives each pipeline a fork of the
full cache compressed exactly as ``attach()`` would have compressed it at the end of that forward (tested: the
same kept positions and the same answers on the real model).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvpipe.core.context import Observation
from kvpipe.core.plan import Plan, validated
from kvpipe.models import cache_arg
from kvpipe.runtime import compressor
from kvpipe.runtime.attach import ForwardState, Handle, Session
from kvpipe.runtime.cache import KVPipeCache, cache_bytes


@dataclass(frozen=True)
class Capture:
    """One recorded prefill: the full cache it filled and what attention saw in every layer."""

    cache: KVPipeCache                  # uncompressed, stand-alone (fork it; never extend it)
    observations: list[Observation]     # per layer, in layer order
    padding: torch.Tensor | None        # the 2D mask ``[B, n]`` the prefill ran with
    prefill_seconds: float              # the recording forward (observation included)

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

    def __init__(self, pipeline: Plan, model: torch.nn.Module, tokenizer=None):
        super().__init__(pipeline, model, tokenizer)
        self.observations: dict[int, Observation] = {}

    def fires(self, cache: KVPipeCache, new_tokens: int) -> bool:
        return cache.get_seq_length() == 0

    def record(self, forward: ForwardState, obs: Observation) -> None:
        self.observations[obs.layer_idx] = obs

    def finish(self, forward: ForwardState) -> None:
        pass


def capture(model: torch.nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
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
        observations = handle.session.observations
    cache.rebind(None)
    cache.peak_bytes = cache_bytes(cache)
    return Capture(cache, [observations[i] for i in sorted(observations)], attention_mask, seconds)


def compressed(pipeline: Plan, captured: Capture) -> KVPipeCache:
    """A fork of ``captured``'s cache, compressed as ``pipeline.attach()`` compresses at the end of the same
    prefill (if its trigger fires then; otherwise the fork is returned full, as attach would leave it). Hand it
    to ``handle.take`` of an attach of ``pipeline`` to keep decoding with the pipeline's later triggers."""
    if pipeline.probers:
        raise ValueError(f"stages {[s.id for s in pipeline.probers]} probe the model after the prefill, which a "
                         "capture does not hold; attach the pipeline instead")
    cache = captured.cache.fork()
    if not pipeline.fires(0, 0, captured.tokens):
        return cache
    observed: compressor.Observed = {}
    with torch.inference_mode():
        for obs in captured.observations:
            for stage_id, value in compressor.observe(pipeline, obs).items():
                observed.setdefault(stage_id, {})[obs.layer_idx] = value
        compressor.compress(pipeline, cache, captured.padding, observed)
        for layer in cache.layers:
            layer.settle()
    return cache
