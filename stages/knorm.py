"""KNorm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression")."""
from __future__ import annotations

from kvpipe.core.context import CompressionContext
from kvpipe.core.registry import Stage, register


@register("knorm", family="scoring")
class KNorm(Stage):
    """Score = -||k||2: keys with a small norm tend to draw more attention. Needs no queries.

    Comparable within a head only (norms differ between heads); use `global` with calibration to pool heads.
    """

    writes = ("scores",)

    def __call__(self, ctx: CompressionContext) -> None:
        ctx.write(self, "scores", [-view.keys.float().norm(dim=-1) for view in ctx.layers])
