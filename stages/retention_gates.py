"""Learned retention gates (TrimKV / DBTrimKV, Bui et al., arXiv 2512.03324 and 2605.09649)."""
from __future__ import annotations

import torch
from pydantic import Field

from kvpipe.core.context import CompressionContext
from kvpipe.core.gates import RetentionGates, retention_scores
from kvpipe.core.registry import Params, Stage, register
from kvpipe.errors import KVPipeError


class RetentionGateParams(Params):
    gates: str = Field("smollm2-135m", description="a shipped gate name or a .safetensors file from "
                                                     "`kvpipe train-gates`")
    lookahead: int = Field(1, ge=1, description="steps of future retention scored (1 = TrimKV's (t - i)·log β)")


@register("retention_gates", family="scoring")
class RetentionGatesStage(Stage[RetentionGateParams]):
    """Score = geometric retention ``(t − pos)·log β``, ``log β`` from a trained gate on each cached key and
    value (see ``kvpipe.core.gates``). Query-agnostic: needs no attention, works at any compression event.

    Scores are log-retentions on one scale across layers and heads (the gates' readout is shared): pair with
    ``global`` and ``calibration: none`` so every layer and head competes for one budget, as DBTrimKV does.

    Gates distilled from reconstruction scores (``kvpipe train-gates --target reconstruction``; the gate file
    says so) predict a token's log reconstruction score itself: then the score is ``log β`` as is, with no age.
    """

    Params = RetentionGateParams
    writes = ("scores",)

    def __init__(self, params: RetentionGateParams, node_id: str | None = None):
        super().__init__(params, node_id)
        # the gate file is read and checked at build(), not at the first compression
        self.loaded: tuple[RetentionGates, dict] = RetentionGates.load(params.gates)

    @property
    def gates(self) -> RetentionGates:
        return self.loaded[0]

    @property
    def predicts_scores(self) -> bool:
        """Distilled gates predict the score itself (files before distillation record no target: KL)."""
        return self.loaded[1]["target"] == "reconstruction"

    def __call__(self, ctx: CompressionContext) -> None:
        first = ctx.layers[0].keys
        if self.predicts_scores and self.params.lookahead != 1:
            raise KVPipeError(f"stage {self.id!r}: gates {self.params.gates!r} were distilled from reconstruction "
                              "scores and predict the score itself; `lookahead` applies to KL-trained gates only")
        heads = ctx.shards.heads(first.shape[1])                     # this rank's KV heads (tensor parallelism)
        self.gates.check_shape(len(ctx.layers), first.shape[1] * ctx.shards.world, first.shape[-1],
                               repr(self.params.gates))
        # t = the next token's position, per row (the newest stored position + 1)
        newest = torch.stack([view.positions.masked_fill(~view.valid, -1).amax((1, 2)).to(first.device)
                              for view in ctx.layers])                     # layers may sit on several devices
        next_position = newest.amax(0) + 1
        with torch.no_grad():
            log_betas = [self.gates(i, view.keys, view.values, heads) for i, view in enumerate(ctx.layers)]
            scores = log_betas if self.predicts_scores else [
                retention_scores(log_beta, view.positions, next_position.to(view.keys.device), self.params.lookahead)
                for log_beta, view in zip(log_betas, ctx.layers)]
        ctx.write(self, "scores", scores)
