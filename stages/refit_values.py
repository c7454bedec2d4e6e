"""Value refit (after GRKV / Attention Matching): least-squares correction of the kept
values so the compressed cache reproduces the full cache's attention output on observation queries."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.context import CompressionContext, Observation
from kvpipe.core.registry import Params, Stage, register


class RefitValuesParams(Params):
    window: int = Field(64, ge=2, description="observation queries: the last `window` real prompt queries; the "
                                              "earlier half fits, the later half (the 'future') validates")
    ridge: float = Field(0.1, gt=0, description="λ0: regularisation towards the original values, relative to "
                                                "the trace of A·Aᵀ (large = change little)")


@register("refit_values", family="evidence recovery")
class RefitValues(Stage[RefitValuesParams]):
    """After eviction: per (row, KV head), V' = V_S + A_Sᵀ (A_S A_Sᵀ + λI)⁻¹ (O − A_S V_S), where A_S is the
    attention of the fitting queries restricted to the kept slots and O the full cache's output. Keys are
    never changed. A head keeps its refit only if the error on the held-out (later) queries goes down;
    ``report`` holds both errors per layer. Place it before ``quantize`` (the refit values are then packed)."""

    Params = RefitValuesParams
    reads = ("keep",)
    writes = ("values",)
    observes = True

    def __init__(self, params: RefitValuesParams, node_id: str | None = None):
        super().__init__(params, node_id)
        self.report: list[dict[str, float]] = []     # per layer, from the last compression

    def observe(self, obs: Observation) -> torch.Tensor:
        """``float32 [B, Hq, w, D + 1]``: the window's queries (scaled) and whether each is a real token."""
        first = max(obs.query.shape[2] - self.params.window, 0)
        batch, heads, w, _ = obs.query[:, :, first:].shape
        return torch.cat([obs.query[:, :, first:].float() * obs.scaling,
                          obs.query_valid[:, None, first:, None].float().expand(batch, heads, w, 1)], -1)

    def __call__(self, ctx: CompressionContext) -> None:
        refitted, self.report = [], []
        for view, keep, observed in zip(ctx.layers, ctx.read(self, "keep"), ctx.observed(self)):
            batch, kv_heads, _, dim = view.keys.shape
            group, window = observed.shape[1] // kv_heads, observed.shape[2]
            queries = observed.reshape(batch, kv_heads, group * window, dim + 1)         # rows: head-major
            scores = queries[..., :dim] @ view.keys.float().transpose(-1, -2)            # [B, Hkv, R, n]
            # The window is the forward's last tokens: query j sits at logical position last - (w - 1 - j).
            last = view.positions.masked_fill(~view.valid, -1).amax(dim=(1, 2))          # [B]
            row = torch.arange(group * window, device=scores.device) % window
            query_position = last[:, None] - (window - 1 - row)                          # [B, R]
            visible = view.valid[:, :, None] & (view.positions[:, :, None] <= query_position[:, None, :, None])
            live = queries[..., dim] > 0
            target = _softmax(scores, visible) @ view.values.float()                     # the full output
            kept = _softmax(scores, visible & keep[:, :, None])
            fit, held = live & (row < window // 2), live & (row >= window // 2)
            values, report = ridge_refit(kept, target, view.values.float(), fit, held, self.params.ridge)
            refitted.append(torch.where(keep[..., None], values, view.values.float()).to(view.values.dtype))
            self.report.append(report)
        ctx.write(self, "values", refitted)


def ridge_refit(weights: torch.Tensor, target: torch.Tensor, values: torch.Tensor, fit: torch.Tensor,
                held: torch.Tensor, ridge: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Refit ``values [..., n, D]`` so ``weights [..., R, n] @ values`` matches ``target [..., R, D]`` on the
    ``fit`` rows (``bool [..., R]``); keep the refit per head only where the error on the ``held`` rows falls.

    Returns the values and the mean relative errors before/after on both row sets, and the accepted share.
    """
    a = weights * fit[..., None]
    gram = a @ a.transpose(-1, -2)                                                       # [..., R, R]
    lam = ridge * gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-12) / fit.sum(-1).clamp_min(1)
    eye = torch.eye(gram.shape[-1], device=gram.device)
    residual = (target - weights @ values) * fit[..., None]
    update = a.transpose(-1, -2) @ torch.linalg.solve(gram + lam[..., None, None] * eye, residual)
    candidate = values + update
    err = lambda v, rows: _relative_error(weights @ v, target, rows)  # noqa: E731
    before_fit, after_fit = err(values, fit), err(candidate, fit)
    before_held, after_held = err(values, held), err(candidate, held)
    accept = after_held < before_held
    report = {"fit_error_before": float(before_fit.mean()), "fit_error_after": float(after_fit.mean()),
              "held_error_before": float(before_held.mean()), "held_error_after": float(after_held.mean()),
              "accepted": float(accept.float().mean())}
    return torch.where(accept[..., None, None], candidate, values), report


def _relative_error(output: torch.Tensor, target: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    diff = ((output - target) * rows[..., None]).flatten(-2).norm(dim=-1)
    return diff / (target * rows[..., None]).flatten(-2).norm(dim=-1).clamp_min(1e-12)


def _softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
