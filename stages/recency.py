"""Recency: later tokens score higher. With `sinks_window` in front this is StreamingLLM (Xiao et al.,
ICLR 2024, "Efficient Streaming Language Models with Attention Sinks")."""
from __future__ import annotations

from kvpipe.core.context import CompressionContext
from kvpipe.core.registry import Stage, register


@register("recency", family="scoring")
class Recency(Stage):
    """Score = the token's position: top-k then keeps the most recent tokens (plus whatever is protected)."""

    writes = ("scores",)

    def __call__(self, ctx: CompressionContext) -> None:
        ctx.write(self, "scores", [view.positions.float() for view in ctx.layers])
