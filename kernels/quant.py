"""Asymmetric integer quantization and bit packing (torch reference, the ground truth for the Triton kernels).

One group of values ``x`` with minimum ``m`` and maximum ``M`` is stored as codes ``c`` in ``[0, 2^b - 1]``,
a scale ``s = (M - m) / (2^b - 1)`` and the minimum ``m``; ``x̂ = c·s + m``.

Rules every implementation follows, so that the torch path and the kernels agree bit for bit:

* ``s`` and ``m`` are stored in a 16-bit dtype, ``s`` rounded **up** and ``m`` **down**, and the codes are
  computed from the **stored** values: then every input lies inside the representable range and the error of
  one element is at most ``s/2`` plus the 16-bit rounding of ``m``.
* rounding is ``floor(v + 0.5)`` (Triton's interpreter has no ``rint``);
* a constant group gets ``s = tiny`` (the dtype's smallest normal number): codes 0, ``x̂ = m``.
* packing is into bytes in **split order** (``pack_codes``): field ``j`` of byte ``k`` holds element ``k + j·m`` of
  a row of ``m`` bytes, the order the fused decode kernel unpacks straight into dot operands (layout 2; layout 1
  was KIVI's LSB-first int32 words).
"""
from __future__ import annotations

import torch

BITS = (2, 4, 8)


def fields_per_byte(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return 8 // bits


def check_finite(x: torch.Tensor, what: str, scale_dtype: torch.dtype) -> None:
    """Refuse NaN/inf (they would poison a whole group silently) and values the scale dtype cannot hold."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot quantize {what}: it contains NaN or inf (the model produced non-finite "
                         "key/value states; quantizing them would corrupt every token of the group)")
    limit = torch.finfo(scale_dtype).max
    if x.numel() and float(x.abs().max()) > limit / 2:
        raise ValueError(f"cannot quantize {what}: |values| up to {float(x.abs().max()):.3g} exceed what "
                         f"{scale_dtype} scales can hold ({limit:.3g}/2); use scale_dtype: bfloat16")


def round_up(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` (fp32) in ``dtype``, never smaller than ``v``."""
    stored = v.to(dtype)
    return torch.where(stored.float() < v, torch.nextafter(stored, stored.new_tensor(float("inf"))), stored)


def round_down(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``v`` (fp32) in ``dtype``, never larger than ``v``."""
    stored = v.to(dtype)
    return torch.where(stored.float() > v, torch.nextafter(stored, stored.new_tensor(float("-inf"))), stored)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int, scale_dtype: torch.dtype):
    """Stored ``(scale, minimum)`` in ``scale_dtype`` for groups spanning ``[lo, hi]`` (fp32, any shape)."""
    tiny = torch.finfo(scale_dtype).tiny
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(tiny)
    return round_up(scale, scale_dtype), round_down(lo, scale_dtype)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    """``int32`` codes of ``x`` with broadcastable stored ``scale``/``minimum``."""
    v = (x.float() - minimum.float()) / scale.float()
    return torch.floor(v + 0.5).clamp_(0, 2 ** bits - 1).to(torch.int32)


def dequantize_into(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = codes·scale + minimum``, computed in fp32 (broadcasting), stored in ``out``'s dtype."""
    if out.dtype == torch.float32:
        return torch.addcmul(minimum.float(), codes, scale.float(), out=out)
    return out.copy_(torch.addcmul(minimum.float(), codes, scale.float()))


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``[..., n]`` codes (``n`` a multiple of ``8 // bits``) into ``uint8 [..., n·bits/8]``, split order.

    With ``F = 8 // bits`` fields per byte and ``m = n / F`` bytes, field ``j`` of byte ``k`` (bits ``[j·b,
    (j+1)·b)``) holds element ``k + j·m``: the low nibbles of a row of bytes are the first half of the row, the high
    nibbles the second half (int2: four quarters). Unpacking a byte tile then yields ``F`` tiles that are each a
    contiguous slice of the row, already in the order a dot product over the row wants them, with no interleave.
    """
    per = fields_per_byte(bits)
    if codes.shape[-1] % per:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes into bytes of {per}")
    fields = codes.to(torch.int32).reshape(*codes.shape[:-1], per, codes.shape[-1] // per)
    packed = fields[..., 0, :]
    for j in range(1, per):
        packed = packed | (fields[..., j, :] << (bits * j))
    return packed.to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: ``uint8 [..., m]`` → ``uint8 [..., m·8/bits]``."""
    per = fields_per_byte(bits)
    if per == 1:
        return packed.clone()
    mask = 2 ** bits - 1
    return torch.cat([(packed >> (bits * j)) & mask for j in range(per)], -1)
