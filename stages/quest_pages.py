"""Quest (Tang et al., ICML 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference")."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.context import Observation
from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import CandidateStage
from kvpipe.kernels.topk import ranks


class QuestPagesParams(Params):
    page_size: int = Field(16, ge=1, description="tokens per page")
    pages: float = Field(0.5, gt=0, le=1, description="share of each head's pages left eligible")
    window: int = Field(8, ge=1, description="prompt queries (the last ones) whose bounds are maxed over")


@register("quest_pages", family="candidate selection")
class QuestPages(CandidateStage[QuestPagesParams]):
    """Pages of consecutive slots keep a per-channel min and max key; ``sum_d max(q_d·min_d, q_d·max_d)`` bounds
    any ``q·k`` in the page from above. Pages with the highest bound (max over the window's queries and the
    query heads of a KV head) stay eligible. Quest uses the bound to pick pages to *read*; here it decides
    which pages later stages may *keep*. Upstream protection is kept."""

    Params = QuestPagesParams
    observes = True

    def observe(self, obs: Observation) -> torch.Tensor:
        """``float32 [B, Hkv, pages]``: the upper bound of each page, physical slot order."""
        page = self.params.page_size
        batch, kv_heads, kv, dim = obs.key.shape
        pages = -(-kv // page)
        keys = obs.key.float()
        valid = obs.key_valid[..., None]
        lo = keys.masked_fill(~valid, float("inf"))
        hi = keys.masked_fill(~valid, float("-inf"))
        pad = pages * page - kv
        lo = torch.nn.functional.pad(lo, (0, 0, 0, pad), value=float("inf")).view(batch, kv_heads, pages, page, dim)
        hi = torch.nn.functional.pad(hi, (0, 0, 0, pad), value=float("-inf")).view(batch, kv_heads, pages, page, dim)
        lo, hi = obs.per_query_head(lo.amin(3)), obs.per_query_head(hi.amax(3))       # [B, Hq, pages, D]
        q = obs.query.shape[2]
        queries = obs.query[:, :, max(0, q - self.params.window):].float()           # [B, Hq, w, D]
        bound = torch.maximum(queries[:, :, :, None] * lo[:, :, None], queries[:, :, :, None] * hi[:, :, None])
        bound = bound.nan_to_num(float("-inf"), float("-inf"), float("-inf")).sum(-1)  # [B, Hq, w, pages]
        live = obs.query_valid[:, None, max(0, q - self.params.window):, None]
        bound = bound.masked_fill(~live, float("-inf")).amax(2)
        return obs.to_kv_heads(bound, "max")

    def refine(self, ctx, view, upstream, bound):
        if bound.shape[-1] * self.params.page_size < view.valid.shape[-1]:
            raise RuntimeError("quest_pages observed fewer slots than the cache holds")
        chosen = torch.ceil((bound > float("-inf")).sum(-1) * self.params.pages).long()
        page_ok = ranks(bound) < chosen[..., None]                                     # [B, Hkv, pages]
        return upstream.narrowed(page_ok.repeat_interleave(self.params.page_size, dim=-1)[..., : view.valid.shape[-1]])
