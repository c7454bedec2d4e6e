"""Packed bytes into tensor-core operands, in registers: the unpack of page layout 2 (``kernels.pages``).

A byte holds ``8 // bits`` fields in split order; ``fields(b, ...)`` turns a byte tile ``uint8 [R, N]`` into one
tile per field, each ``OFFSET + 2^(bits·j)·code`` in the dot dtype (the field kept in place: no shift, no
integer-to-float conversion). Compiled, per 32-bit word two ``prmt`` spread the 4 bytes over 16-bit lanes, then one
``lop3`` per field and lane pair keeps the field's bits and ORs in 0x6400, the fp16 pattern of 1024 whose mantissa
step is 1 (Marlin's and BitDecoding's trick): 4 bytes give 8 exact fp16 numbers for int4 in 6 instructions. Triton's
interpreter cannot run inline PTX; there the same numbers come from plain integer operations.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAGIC = tl.constexpr(0x6400)     # fp16 1024.0: its mantissa step is 1, so OR-ing a code < 1024 in adds it exactly


def unpack_ptx(bits: int) -> tuple[str, str]:
    """The inline PTX of one 32-bit word of ``bits``-bit fields and its constraints: outputs ``$0 .. $(2F-1)``
    (field ``j`` in ``$2j`` and ``$2j+1``, two fp16 lanes each), the packed word ``$2F``."""
    fields = 8 // bits
    lines = [".reg .b32 lo, hi;", f"prmt.b32 lo, ${2 * fields}, 0, 0x4140;", f"prmt.b32 hi, ${2 * fields}, 0, 0x4342;"]
    for j in range(fields):
        mask = ((2 ** bits - 1) << (bits * j)) * 0x10001            # the field in both 16-bit lanes
        lines += [f"lop3.b32 ${2 * j + half}, {lanes}, {mask:#010x}, 0x64006400, 0xEA;"
                  for half, lanes in enumerate(("lo", "hi"))]
    return "{\n" + "\n".join(lines) + "\n}", ",".join(["=r"] * (2 * fields) + ["r"])


_PTX8, _OUT8 = (tl.constexpr(text) for text in unpack_ptx(8))
_PTX4, _OUT4 = (tl.constexpr(text) for text in unpack_ptx(4))
_PTX2, _OUT2 = (tl.constexpr(text) for text in unpack_ptx(2))


@triton.jit
def _fields_ptx(b, BITS: tl.constexpr):
    """Compiled: the fields of bytes ``b`` by ``unpack_ptx`` (4 bytes per call, ``pack=4``)."""
    if BITS == 4:
        return tl.inline_asm_elementwise(asm=_PTX4, constraints=_OUT4, args=[b], dtype=(tl.float16, tl.float16),
                                         is_pure=True, pack=4)
    elif BITS == 2:
        return tl.inline_asm_elementwise(asm=_PTX2, constraints=_OUT2, args=[b],
                                         dtype=(tl.float16, tl.float16, tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        return (tl.inline_asm_elementwise(asm=_PTX8, constraints=_OUT8, args=[b], dtype=tl.float16, is_pure=True,
                                          pack=4),)


@triton.jit
def _field_plain(x, BITS: tl.constexpr, J: tl.constexpr, OFFSET: tl.constexpr, DOT: tl.constexpr):
    """Field ``J`` of bytes ``x`` (int16) kept in place, ``OFFSET + 2^(BITS·J)·code``, with plain operations: the
    fp16 bit trick when ``OFFSET`` is 1024, else an integer conversion (fp32 operands)."""
    bits = x & (((1 << BITS) - 1) << (BITS * J))
    if OFFSET == 0:
        return bits.to(DOT)
    return (bits | MAGIC).to(tl.float16, bitcast=True).to(DOT)


@triton.jit
def fields(b, BITS: tl.constexpr, OFFSET: tl.constexpr, DOT: tl.constexpr, ASM: tl.constexpr):
    """Bytes ``[R, N]`` → a tuple of ``8 // BITS`` tiles ``[R, N]`` in ``DOT``: field ``j`` of every byte, in place
    (``OFFSET + 2^(BITS·j)·code``). In the split order field ``j`` of byte row ``r`` is element ``r + j·R``.
    ``ASM``: the PTX path (compiled, ``OFFSET`` 1024, fp16), else plain operations."""
    if ASM:
        return _fields_ptx(b, BITS)
    x = b.to(tl.int16)
    if BITS == 4:
        return _field_plain(x, 4, 0, OFFSET, DOT), _field_plain(x, 4, 1, OFFSET, DOT)
    elif BITS == 2:
        return (_field_plain(x, 2, 0, OFFSET, DOT), _field_plain(x, 2, 1, OFFSET, DOT),
                _field_plain(x, 2, 2, OFFSET, DOT), _field_plain(x, 2, 3, OFFSET, DOT))
    else:
        return (_field_plain(x, 8, 0, OFFSET, DOT),)
