"""The probe forward of probing stages (``kvpipe.core.stage_bases.ProbingScorer``, e.g. ``reconstruction``).

After the compressing forward, and before the compression, the model reads that forward's tokens again,
teacher-forced, ``chunk`` tokens at a time, each chunk after the stage's prompt on its own **fork** of the cache
(KVzip's chunked repeat: the cache itself is not extended, every fork is dropped, so a probe forward holds
at most the context plus prompt plus one chunk, and attends over no more). The attention function hands every
layer's observation to the probe instead of the pipeline; each stage's values for the slots being compressed
are reduced by maximum over the probe's forwards. The probe runs through the attached decoder, so what a layer
exposes (masks per head, positions, rotary) is what a normal forward sees.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from kvpipe.core.context import Observation
from kvpipe.core.stage_bases import ProbingScorer
from kvpipe.errors import UnsupportedModelError
from kvpipe.runtime.adapters import attention_modules


@dataclass
class Probe:
    """What one probe forward collects for ``stage``: per layer, the maximum over chunks of its observation
    of the first ``slots[layer]`` keys."""

    stage: ProbingScorer
    slots: list[int]
    by_layer: dict[int, torch.Tensor] = field(default_factory=dict)
    input_norms: dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [B, q] of the current forward

    def remember_input(self, attention, args, kwargs) -> None:
        """Forward pre-hook on a layer's attention: the norm of its input per token (KVzip+ divides by it)."""
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.input_norms[attention.layer_idx] = hidden.float().norm(dim=-1)

    def record(self, obs: Observation) -> None:
        obs = replace(obs, input_norm=self.input_norms.get(obs.layer_idx))
        value = self.stage.observe(obs)[..., :self.slots[obs.layer_idx]]
        before = self.by_layer.get(obs.layer_idx)
        self.by_layer[obs.layer_idx] = value if before is None else torch.maximum(before, value)


def run(session, forward) -> dict[str, dict[int, torch.Tensor]]:
    """Every probing stage's scores for the slots ``forward`` compresses: ``{stage id: {layer: [B, Hkv, n]}}``.
    Adds the probes' time to ``forward.cache.probe_seconds``."""
    started = time.perf_counter()
    observed = {stage.id: run_stage(session, forward, stage) for stage in session.pipeline.probers}
    forward.cache.probe_seconds += time.perf_counter() - started
    return observed


def run_stage(session, forward, stage) -> dict[int, torch.Tensor]:
    """One probing stage's scores ``{layer: [B, Hkv, n]}`` for the slots of ``forward.cache``: ``forward.ids``
    read again ``stage.chunk`` tokens at a time, each chunk after the stage's prompt on a fresh fork."""
    ids = forward.ids
    if ids is None:
        raise UnsupportedModelError(f"stage {stage.id!r} reads the context again by token id, and this forward was "
                                    "given inputs_embeds; pass input_ids")
    prompt = torch.tensor(session.probe_prompts[stage.id], dtype=ids.dtype, device=ids.device).expand(ids.shape[0], -1)
    # slots per layer index (only compressed layers are observed; the others' entries are never read)
    probe = Probe(stage, [getattr(layer, "physical_length", 0) for layer in forward.cache.layers])
    session.probing = probe
    hooks = [attention.register_forward_pre_hook(probe.remember_input, with_kwargs=True)
             for attention in attention_modules(session.model)]
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[1], stage.chunk):
                end = min(start + stage.chunk, ids.shape[1])
                # padding: the cache's own, the prompt real, the chunk's tokens padded as they were
                padding = (torch.cat([forward.padding, torch.ones_like(prompt),
                                      forward.padding[:, -ids.shape[1]:][:, start:end]], 1)
                           if forward.padding is not None else None)
                session.decoder(input_ids=torch.cat([prompt, ids[:, start:end]], 1), attention_mask=padding,
                                use_cache=True, **{session.cache_kwarg: forward.cache.fork()})
    finally:
        session.probing = None
        for hook in hooks:
            hook.remove()
    return {layer: stage.after_probe(value) for layer, value in probe.by_layer.items()}
