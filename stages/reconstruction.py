"""Context reconstruction (KVzip: Kim et al., NeurIPS 2025, arXiv 2505.23416): keep what the model needs to
repeat its context, which does not depend on the question that will come later."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpipe.core.context import Observation
from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import ProbingScorer
from kvpipe.errors import KVPipeError
from kvpipe.stages.attention_mass import PoolKernel, pool_neighbours


class ReconstructionParams(Params):
    prompt: str = Field("\n\nRepeat the previous context exactly.\n\n",
                        description="text fed before the context is read again (KVzip's repeat prompt); needs the "
                                    "tokenizer at attach: pipeline.attach(model, tokenizer=...). '' = none")
    chunk: int = Field(256, ge=1, description="probe tokens per forward: the probe's attention memory is "
                                              "[B, heads, chunk, context] per layer")
    pool: PoolKernel = Field(1, ge=1, description="max-pool scores over this many neighbouring tokens (odd; 1 = off)")
    normalize: Literal["none", "plus"] = Field(
        "none", description="'plus' (KVzip+): weigh each attention probability by what it moves into the "
                            "residual stream, ‖W_O^h v‖ / ‖x‖ (x: the layer's input at the re-reading token)")


@register("reconstruction", family="scoring")
class Reconstruction(ProbingScorer[ReconstructionParams]):
    """Score = the most attention a cached token receives while the model re-reads the whole context after a
    repeat prompt (teacher-forced, ``chunk`` tokens per forward), maximum over the queries and over the query
    heads sharing its KV head. A token the model never looks at to reproduce the context is one no later
    question can need through it. Costs a second pass over the context at every compression (about one
    prefill more); query-agnostic by construction."""

    Params = ReconstructionParams

    @property
    def chunk(self) -> int:
        return self.params.chunk

    def prompt_ids(self, tokenizer) -> list[int]:
        if not self.params.prompt:
            return []
        if tokenizer is None:
            raise KVPipeError(f"stage {self.id!r} encodes its repeat prompt with the model's tokenizer: attach with "
                              "pipeline.attach(model, tokenizer=tokenizer) (or set prompt: '' to read the context "
                              "again without one)")
        return tokenizer(self.params.prompt, add_special_tokens=False).input_ids

    def observe(self, obs: Observation) -> torch.Tensor:
        """``float32 [B, Hkv, kv]``: per key, the largest attention any probe query of its group gives it
        (``plus``: the largest ``p · ‖W_O^h v‖ / ‖x‖`` over the group's heads h and the probe's queries)."""
        if self.params.normalize == "none":
            return obs.max_attention()
        if obs.input_norm is None:
            raise KVPipeError(f"stage {self.id!r} (normalize: plus) needs the layer inputs' norms, which only its "
                              "probe forward records")
        per_head = obs.max_attention(query_weight=obs.input_norm.clamp_min(1e-6).reciprocal(),
                                     over_heads=False)                                 # [B, Hkv, G, kv]
        written = obs.projected_l2(obs.per_query_head(obs.value)).view_as(per_head)
        return (per_head * written).amax(2)

    def after_probe(self, scores: torch.Tensor) -> torch.Tensor:
        return pool_neighbours(scores, self.params.pool)      # over the context's slots only
