"""CriticalKV (Feng et al., 2025, "Identify Critical KV Cache in LLM Inference from an Output Perturbation
Perspective"): attention weighted by how far each value moves the output through W_O."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.context import Observation
from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import ObservingScorer
from kvpipe.stages.attention_mass import PoolKernel, attention_mass, pool_neighbours


class CriticalParams(Params):
    window: int | None = Field(32, ge=1, description="observation window of prompt queries (null = all)")
    epsilon: float = Field(1e-4, ge=0, description="added to the attention so zero-attention tokens still rank")
    pool: PoolKernel = Field(1, ge=1, description="max-pool kernel over neighbouring tokens (odd; 1 = none)")


@register("critical", family="scoring")
class Critical(ObservingScorer[CriticalParams]):
    """Score = (a_i + eps) * mean over the GQA group of ||W_O^h v_i||1, a_i = window attention mass.

    This is the criterion of CriticalKV's second stage, an L1 bound on the output perturbation of evicting
    token i. The paper's two-stage split (first half of the budget by attention alone) is not applied here.
    """

    Params = CriticalParams

    def observe(self, obs: Observation) -> torch.Tensor:
        """``float32 [B, Hkv, kv]``."""
        mass = attention_mass(obs, self.params.window, normalize=True)                   # [B, Hq, kv]
        value_effect = obs.projected_l1(obs.per_query_head(obs.value))                    # [B, Hq, kv]
        scores = obs.to_kv_heads((mass + self.params.epsilon) * value_effect, "mean")
        return pool_neighbours(scores, self.params.pool)
