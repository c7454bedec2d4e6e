"""Low-bit KV storage: KIVI-style asymmetric quantization into packed pages, with a full-precision residual."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kvpipe.core.quantization import Quantization
from kvpipe.core.registry import Params, register
from kvpipe.core.stage_bases import StorageStage
from kvpipe.errors import KVPipeError
from kvpipe.kernels.pages import PageFormat, minmax_range
from kvpipe.kernels.quant import affine_params

Bits = Literal[2, 4, 8]


class QuantizeParams(Params):
    method: Literal["kivi", "hqq", "quanto"] = Field(
        "kivi", description="how each group's scale and minimum are chosen: kivi = min/max (ours); hqq = HQQ's "
                            "half-quadratic optimised zero point (`pip install kvpipe[hqq]`); quanto = "
                            "optimum-quanto's MaxOptimizer (`pip install kvpipe[quanto]`)")
    bits: Bits = Field(4, description="code width for keys and values")
    key_bits: Bits | None = Field(None, description="code width for keys (default: bits)")
    value_bits: Bits | None = Field(None, description="code width for values (default: bits)")
    group_size: Literal[32, 64, 128] = Field(
        64, description="keys: tokens per per-channel group (= tokens per page); values: channels per per-token "
                        "group (capped at the head dimension)")
    residual: int = Field(128, ge=0, description="most recent tokens per head kept unquantized (KIVI's window); "
                                                 "older ones are flushed into pages as the window fills")
    scale_dtype: Literal["float16", "bfloat16"] = Field("float16", description="dtype of scales and minima")
    rotate: Literal["none", "hadamard"] = Field(
        "none", description="hadamard = each head's keys and values multiplied by a seeded randomized Hadamard "
                            "matrix before quantization (outlier channels spread out; exact when read back); "
                            "torch backend, power-of-two head dimension")
    rotation_seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the rotation's random signs")


@register("quantize", family="quantization")
class Quantize(StorageStage[QuantizeParams]):
    """KIVI (Liu et al., ICML 2024): keys quantized per channel over groups of tokens, values per token over
    groups of channels, asymmetric (scale + minimum), codes packed into bytes in split order (page layout 2).

    The cache stores every kept token this way except the newest ``residual`` of each head, and keeps flushing
    whole pages as decoding adds tokens. Stages placed **after** this one see the keys and values as the
    quantized cache will return them (dequantized); the cache itself quantizes the kept original tokens once
    (``StorageStage``).
    """

    Params = QuantizeParams

    def __init__(self, params: QuantizeParams, node_id: str | None = None):
        super().__init__(params, node_id)
        self.group_range = GROUP_RANGES[params.method]()     # a missing backend fails at build time

    def storage(self, head_dim: int) -> Quantization:
        """The page format and residual window for heads of ``head_dim`` channels."""
        p = self.params
        value_group = min(p.group_size, head_dim)
        if head_dim % value_group:
            raise KVPipeError(f"quantize: the head dimension {head_dim} is not a multiple of group_size "
                              f"{p.group_size}; pick a group_size that divides it")
        if p.rotate != "none" and head_dim & (head_dim - 1):
            raise KVPipeError(f"quantize: rotate: {p.rotate} needs a power-of-two head dimension, not {head_dim}; "
                              "use rotate: none")
        fmt = PageFormat(p.key_bits or p.bits, p.value_bits or p.bits, p.group_size, value_group,
                         getattr(torch, p.scale_dtype))
        return Quantization(fmt, p.residual, p.method, self.group_range, rotate=p.rotate,
                            rotation_seed=p.rotation_seed)


def _hqq_range():
    try:
        from hqq.core.quantize import Quantizer
    except ImportError as err:
        raise KVPipeError("quantize method 'hqq' needs the hqq package: pip install 'kvpipe[hqq]'") from err

    def group_range(groups: torch.Tensor, bits: int, scale_dtype: torch.dtype):
        # HQQ works on rows: axis=1 with group_size = the row length gives one (scale, zero) per group,
        # zero optimised by half-quadratic splitting (p=0.7, 20 iterations). HQQ's W = (W_q - zero)·scale
        # is our x = c·s + m with s = scale, m = -zero·scale.
        rows = groups.reshape(-1, groups.shape[-1])
        _, meta = Quantizer.quantize(rows, nbits=bits, group_size=rows.shape[-1], axis=1, optimize=True,
                                     bitpack=False, compute_dtype=torch.float32, device=str(rows.device))
        scale = meta["scale"].float().reshape(*groups.shape[:-1], 1)
        minimum = -meta["zero"].float().reshape(*groups.shape[:-1], 1) * scale
        top = minimum + scale * (2 ** bits - 1)
        return affine_params(minimum, top, bits, scale_dtype)

    return group_range


def _quanto_range():
    try:
        from optimum.quanto import MaxOptimizer, qint2, qint4, qint8
    except ImportError as err:
        raise KVPipeError("quantize method 'quanto' needs optimum-quanto: pip install 'kvpipe[quanto]'") from err
    qtypes = {2: qint2, 4: qint4, 8: qint8}

    def group_range(groups: torch.Tensor, bits: int, scale_dtype: torch.dtype):
        # quanto's affine convention: x = data·scale - shift, so the minimum is -shift.
        rows = groups.reshape(-1, groups.shape[-1])
        scale, shift = MaxOptimizer()(rows, qtype=qtypes[bits], axis=0)
        minimum = -shift.float().reshape(*groups.shape[:-1], 1)
        top = minimum + scale.float().reshape(*groups.shape[:-1], 1) * (2 ** bits - 1)
        return affine_params(minimum, top, bits, scale_dtype)

    return group_range


GROUP_RANGES = {"kivi": lambda: minmax_range, "hqq": _hqq_range, "quanto": _quanto_range}
