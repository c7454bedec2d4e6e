"""SnapKV (Li et al., NeurIPS 2024): attention from an observation window of the last prompt queries, pooled."""
from __future__ import annotations

from pydantic import Field

from kvpipe.core.registry import register
from kvpipe.stages.attention_mass import AttentionMass, AttentionMassParams, PoolKernel


class SnapKVParams(AttentionMassParams):
    window: int | None = Field(32, ge=1, description="observation window: the last `window` real prompt queries")
    normalize: bool = Field(False, description="SnapKV sums the window's attention without normalising")
    pool: PoolKernel = Field(7, ge=1, description="max-pool kernel over neighbouring tokens (SnapKV: 7)")


@register("snapkv", family="scoring")
class SnapKV(AttentionMass):
    """Score = max-pool over 7 tokens of the attention the last 32 queries give each token (mean over the
    GQA group). The paper's defaults; attention_mass with other defaults."""

    Params = SnapKVParams
    params: SnapKVParams          # AttentionMass's parameters and its own
