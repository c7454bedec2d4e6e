"""Exact removal effect: how much the layer's output moves if one token is evicted."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.context import Observation
from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import ObservingScorer
from kvpipe.stages.attention_mass import PoolKernel, pool_neighbours


class OutputChangeParams(Params):
    window: int = Field(32, ge=1, description="observation window: the last `window` real prompt queries")
    pool: PoolKernel = Field(1, ge=1, description="max-pool kernel over neighbouring tokens (odd; 1 = none)")


@register("output_change", family="scoring")
class OutputChange(ObservingScorer[OutputChangeParams]):
    """Score = sum over window queries t of  a_ti / (1 - a_ti) * ||W_O^h (v_i - o_t)||2,  mean over the GQA group.

    For one query, removing token i and renormalising changes that head's output by exactly
    a_i/(1-a_i) * (v_i - o); projecting through the head's slice of W_O gives its effect on the residual
    stream. Value-aware and exact for single removals; evicting many tokens interacts (not modelled).
    """

    Params = OutputChangeParams

    def observe(self, obs: Observation) -> torch.Tensor:
        """``float32 [B, Hkv, kv]``."""
        q = obs.query.shape[2]
        start = max(0, q - self.params.window)
        probs = obs.attention_probs(start, q)                                       # [B, Hq, w, kv]
        values = obs.per_query_head(obs.value.float())                              # [B, Hq, kv, D]
        outputs = probs @ values                                                    # [B, Hq, w, D]
        # ‖W_O^h (v - o)‖₂² = vᵀGv + oᵀGo - 2 oᵀGv with G = W_O^hᵀ W_O^h: no [B, Hq, kv, D_model] projection
        gram = obs.out_proj_gram()
        gram_outputs = torch.einsum("bhwd,hde->bhwe", outputs, gram)                 # [B, Hq, w, D]
        squared = ((gram_outputs * outputs).sum(-1)[..., None] - 2 * gram_outputs @ values.transpose(-1, -2)
                   + obs.projected_l2(values, gram).square()[:, :, None])
        distance = squared.clamp_min(0).sqrt()                                      # [B, Hq, w, kv]
        effect = probs / (1 - probs).clamp(min=1e-6) * distance
        return pool_neighbours(obs.to_kv_heads(effect.sum(2), "mean"), self.params.pool)
