"""The probe forward of probing stages (``kvpipe.core.stage_bases.ProbingScorer``, e.g. ``reconstruction``).

After the compressing forward, and before the compression, the model reads that forward's tokens again after
the stage's prompt, teacher-forced, ``chunk`` tokens per forward, on a **fork** of the cache (the cache itself
is not extended, and the fork is dropped). The attention function hands every layer's observation to the probe
instead of the pipeline; each stage's values for the slots being compressed are reduced by maximum over the
probe's forwards. The probe runs through the attached decoder, so what a layer exposes (masks per head,
positions, rotary) is what a normal forward sees.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvpipe.core.context import Observation
from kvpipe.errors import UnsupportedModelError


@dataclass
class Probe:
    """What one probe forward collects for ``stage``: per layer, the maximum over chunks of its observation
    of the first ``slots[layer]`` keys."""

    stage: object                                      # a ProbingScorer
    slots: list[int]
    by_layer: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self, obs: Observation) -> None:
        value = self.stage.observe(obs)[..., :self.slots[obs.layer_idx]]
        before = self.by_layer.get(obs.layer_idx)
        self.by_layer[obs.layer_idx] = value if before is None else torch.maximum(before, value)


def run(session, forward) -> dict[str, dict[int, torch.Tensor]]:
    """Every probing stage's scores for the slots ``forward`` compresses: ``{stage id: {layer: [B, Hkv, n]}}``.
    Adds the probes' time to ``forward.cache.probe_seconds``."""
    stages = session.pipeline.probers
    if forward.ids is None:
        raise UnsupportedModelError(f"stages {[s.id for s in stages]} read the context again by token id, and this "
                                    "forward was given inputs_embeds; pass input_ids")
    started = time.perf_counter()
    ids = forward.ids
    observed = {}
    for stage in stages:
        prompt = torch.tensor(session.probe_prompts[stage.id], dtype=ids.dtype, device=ids.device)
        sequence = torch.cat([prompt.expand(ids.shape[0], -1), ids], 1)
        # padding: the cache's own, the prompt real, the context's tokens padded as they were
        mask = (torch.cat([forward.padding, torch.ones_like(sequence[:, :prompt.numel()]),
                           forward.padding[:, -ids.shape[1]:]], 1) if forward.padding is not None else None)
        seen = forward.cache.get_seq_length()
        probe = Probe(stage, [layer.physical_length for layer in forward.cache.layers])
        fork = forward.cache.fork()
        session.probing = probe
        try:
            with torch.no_grad():
                for start in range(0, sequence.shape[1], stage.chunk):
                    end = min(start + stage.chunk, sequence.shape[1])
                    padding = mask[:, :seen + end] if mask is not None else None
                    session.decoder(input_ids=sequence[:, start:end], attention_mask=padding, use_cache=True,
                                    **{session.cache_kwarg: fork})
        finally:
            session.probing = None
        observed[stage.id] = {layer: stage.after_probe(value) for layer, value in probe.by_layer.items()}
    forward.cache.probe_seconds += time.perf_counter() - started
    return observed
