"""Expected Attention (Devoto et al., 2025, "Expected Attention: KV Cache Compression by Estimating Attention
from Future Queries Distribution")."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.context import Observation
from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import ObservingScorer
from kvpipe.stages.attention_mass import PoolKernel, pool_neighbours


class ExpectedAttentionParams(Params):
    n_future: int = Field(512, ge=1, description="future positions the query distribution is rotated over")
    skip_sinks: int = Field(4, ge=0, description="first prompt queries left out of the statistics")
    window: int | None = Field(None, ge=2, description="fit the statistics to the last `window` queries only "
                                                       "(null = every prompt query, as the paper)")
    covariance: bool = Field(True, description="use the queries' covariance, not only their mean")
    value_norm: bool = Field(True, description="multiply by ||v||2 (value-aware)")
    epsilon: float = Field(0.0, ge=0, description="added to the expected attention before the value norm")
    pool: PoolKernel = Field(1, ge=1, description="max-pool scores over this many neighbouring tokens (odd; 1 = off), "
                                                  "so multi-token facts are kept whole")


@register("expected_attention", family="scoring")
class ExpectedAttention(ObservingScorer[ExpectedAttentionParams]):
    """Models future queries as a Gaussian fitted to the prompt's pre-RoPE queries, rotated to the next
    ``n_future`` positions on average (R̄). Score = softmax_i(μ'·k_i·s + ½ k_iᵀΣ'k_i·s²) with μ' = R̄μ,
    Σ' = R̄ΣR̄ᵀ, s = 1/√d; mean over the GQA group; times ||v_i||. Needs the model's rotary embedding."""

    Params = ExpectedAttentionParams

    def observe(self, obs: Observation) -> torch.Tensor:
        """``float32 [B, Hkv, kv]``."""
        if obs.rotary is None or obs.positions is None:
            raise RuntimeError("expected_attention needs the decoder's rotary embedding and position ids")
        first = self.params.skip_sinks
        if self.params.window is not None:
            first = max(first, obs.query.shape[2] - self.params.window)
        first = min(first, obs.query.shape[2] - 1)        # a decode-step forward has a single query: use it
        queries = obs.query.float()[:, :, first:]                                         # [B, Hq, w, D]
        positions = obs.positions[:, first:]
        cos, sin = (t.float()[:, None] for t in obs.rotary(positions))
        pre_rope = (queries * cos - rotate_half(queries) * sin) / (cos**2 + sin**2)      # undo the rotation
        live = obs.query_valid[:, None, first:, None].float()
        count = live.sum(2).clamp(min=1)
        mean = (pre_rope * live).sum(2) / count                                          # [B, Hq, D]
        centred = (pre_rope - mean[:, :, None]) * live
        ahead = torch.arange(1, self.params.n_future + 1, device=positions.device)
        future = positions.max(-1, keepdim=True).values + ahead
        cos_f, sin_f = (t.float().mean(1) for t in obs.rotary(future))                   # [B, D]
        rotation = average_rotation(cos_f, sin_f)[:, None]                               # [B, 1, D, D]
        mean_f = (rotation @ mean[..., None])[..., 0]                                    # [B, Hq, D]
        keys = obs.per_query_head(obs.key.float())                                       # [B, Hq, kv, D]
        logits = keys @ mean_f[..., None] * obs.scaling                                  # [B, Hq, kv, 1]
        if self.params.covariance:
            cov = centred.transpose(-1, -2) @ centred / count[..., None]                 # [B, Hq, D, D]
            cov_f = rotation @ cov @ rotation.transpose(-1, -2)
            logits = logits + 0.5 * ((keys @ cov_f) * keys).sum(-1, keepdim=True) * obs.scaling**2
        logits = logits[..., 0].masked_fill(~obs.per_query_head(obs.key_valid), float("-inf"))
        scores = obs.to_kv_heads(torch.softmax(logits, -1), "mean")
        if self.params.value_norm:
            scores = (scores + self.params.epsilon) * obs.value.float().norm(dim=-1)
        return pool_neighbours(scores, self.params.pool)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def average_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The matrix ``A [B, D, D]`` with ``A x = x·cos + rotate_half(x)·sin`` (HF's RoPE layout)."""
    dim = cos.shape[-1]
    eye = torch.eye(dim, dtype=cos.dtype, device=cos.device)
    return torch.diag_embed(cos) + sin[..., :, None] * rotate_half(eye).T
