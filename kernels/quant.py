"""Asymmetric integer quantization and bit packing (torch reference, the ground truth for the Triton kernels).

One group of values ``x`` with minimum ``m`` and maximum ``M`` is stored as codes ``c`` in ``[0, 2^b - 1]``,
a scale ``s = (M - m) / (2^b - 1)`` and the minimum ``m``; ``x̂ = c·s + m``.

Rules every implementation follows, so that the torch path and the kernels agree bit for bit:

* ``s`` and ``m`` are stored in a 16-bit dtype, ``s`` rounded **up** and ``m`` **down**, and the codes are
  computed from the **stored** values: then every input lies inside the representable range and the error of
  one element is at most ``s/2`` plus the 16-bit rounding of ``m``.
* rounding is ``floor(v + 0.5)`` (Triton's interpreter has no ``rint``);
* a constant group gets ``s = tiny`` (the dtype's smallest normal number): codes 0, ``x̂ = m``.
* packing is LSB-first into int32 words: element ``j`` of a word sits at bits ``[j·b, (j+1)·b)`` (KIVI's order).
"""
from __future__ import annotations

import sys

import torch

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("kvpipe's packed KV format assumes a little-endian machine")

BITS = (2, 4, 8)


def codes_per_word(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return 32 // bits


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
    """Pack ``int32 [..., n]`` codes (``n`` a multiple of ``32 // bits``) into ``int32 [..., n·bits/32]``."""
    per = codes_per_word(bits)
    if codes.shape[-1] % per:
        raise ValueError(f"cannot pack {codes.shape[-1]} codes into words of {per}")
    fields = codes.to(torch.int32).reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    words = fields << shifts                                   # int32 shifts wrap, as on the GPU
    packed = words[..., 0]
    for j in range(1, per):
        packed = packed | words[..., j]
    return packed


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: ``int32 [..., w]`` → ``uint8 [..., w·32/bits]``.

    LSB-first packing on a little-endian machine (x86, ARM, CUDA) puts codes ``j·8/bits`` to
    ``(j+1)·8/bits - 1`` in byte ``j``. So ``(words >> s) & 0x0F0F0F0F`` (4-bit; ``0x03030303`` for 2-bit)
    leaves, in every byte, the code at offset ``s`` of that byte: whole-word operations, then one interleave.
    """
    codes_per_word(bits)                                                          # validates bits
    per_byte = 8 // bits
    if words.numel() == 0:                       # an empty view may not be reinterpretable as bytes
        return words.new_empty(*words.shape[:-1], words.shape[-1] * 4 * per_byte, dtype=torch.uint8)
    words = words.contiguous()
    if bits == 8:
        return words.view(torch.uint8)
    mask = int.from_bytes(bytes([2 ** bits - 1]) * 4, "little")
    mask = mask - 2 ** 32 if mask >= 2 ** 31 else mask                                # as an int32 constant
    fields = [((words >> shift) if shift else words) & mask for shift in range(0, 8, bits)]
    codes = torch.stack([f.view(torch.uint8) for f in fields], -1)                   # [..., 4w, per_byte]
    return codes.view(*words.shape[:-1], words.shape[-1] * 4 * per_byte)
