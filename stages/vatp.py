"""VATP (Guo et al., EMNLP 2024, "Attention Score is not All You Need for Token Importance")."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpipe.core.context import Observation
from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import ObservingScorer
from kvpipe.stages.attention_mass import attention_mass


class VATPParams(Params):
    window: int | None = Field(None, ge=1, description="queries scored: the last `window` (null = all, as H2O)")
    group: Literal["mean", "max"] = Field("mean", description="how the query heads of one KV head are combined")


@register("vatp", family="scoring")
class VATP(ObservingScorer[VATPParams]):
    """Value-aware: score = attention mass × ||v||1. Tokens drawing attention but carrying tiny values
    (typically sinks) lose; protect sinks with `sinks_window`, as the paper does."""

    Params = VATPParams

    def observe(self, obs: Observation) -> torch.Tensor:
        """``float32 [B, Hkv, kv]``."""
        mass = obs.to_kv_heads(attention_mass(obs, self.params.window, normalize=True), self.params.group)
        return mass * obs.value.float().abs().sum(-1)
