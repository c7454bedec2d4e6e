"""Quantization kernels: torch references (properties) and the Triton kernels against them.

Without a GPU the Triton kernels run in Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``), so shapes
stay small. Integer outputs must be bit-exact; fp32 attention within 1e-5 relative error of the reference.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpipe.core.quantization import Quantization
from kvpipe.kernels.pages import PageFormat, dequantize_pages, quantize_pages
from kvpipe.kernels.quant import pack_codes, unpack_codes
from kvpipe.runtime.quantized_store import QuantizedStore

from conftest import fresh_seed

BITS = [2, 4, 8]


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), rows=st.integers(0, 5), width=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_pack_then_unpack_is_identity(bits, rows, width, seed):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (rows, width * 8 // bits), generator=generator, dtype=torch.int32)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, width)
    assert torch.equal(unpack_codes(packed, bits).int(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_packing_is_in_split_order(bits):
    """Layout 2, written out by hand: field j of byte k (bits j·b ..) holds element k + j·(bytes per row)."""
    generator = torch.Generator().manual_seed(fresh_seed())
    fields, width = 8 // bits, 4
    codes = torch.randint(0, 2 ** bits, (3, width * fields), generator=generator, dtype=torch.int32)
    packed = pack_codes(codes, bits).int()
    for k in range(width):
        for j in range(fields):
            assert torch.equal((packed[:, k] >> (bits * j)) & (2 ** bits - 1), codes[:, k + j * width])


def group_inputs(seed: int, pages: int, group: int, dim: int, kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(pages, group, dim, generator=generator)
    if kind == "constant":                   # constant groups: max == min
        x = x[:, :1].expand_as(x).clone()
    elif kind == "huge":                     # magnitudes near what float16 scales can hold
        x = x * 1e4
    elif kind == "outlier channels":         # a few channels 100x larger, as real keys have
        x[..., : max(dim // 8, 1)] *= 100
    return x


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from(BITS), group=st.sampled_from([32, 64]), dim=st.sampled_from([16, 32]),
       pages=st.integers(1, 3), used=st.integers(1, 64), seed=st.integers(0, 2**31 - 1),
       kind=st.sampled_from(["gaussian", "constant", "huge", "outlier channels"]))
def test_dequantized_error_is_at_most_half_a_step(bits, group, dim, pages, used, seed, kind):
    keys, values = group_inputs(seed, pages, group, dim, kind), group_inputs(seed + 1, pages, group, dim, kind)
    positions = torch.arange(pages * group, dtype=torch.int32).view(pages, group)
    positions[-1, min(used, group):] = -1                                      # a partly used last page
    fmt = PageFormat(bits, bits, group, min(16, dim), torch.float16)
    packed = quantize_pages(keys, values, positions, fmt)
    got_keys, got_values = dequantize_pages(packed, fmt, torch.float32)
    used_slots = (positions >= 0)[..., None]
    # Per element: half a quantization step, plus the stored minimum rounded down to float16 (< 1 ulp = |m|·2^-10).
    key_step = packed.key_scale.float()[:, None, :]
    key_slack = packed.key_min.float().abs()[:, None, :] * 2 ** -10 + 1e-7
    assert bool(((got_keys - keys).abs() <= key_step / 2 + key_slack)[used_slots.expand_as(keys)].all())
    value_step = packed.value_scale.float().repeat_interleave(fmt.value_group, -1)
    value_slack = packed.value_min.float().abs().repeat_interleave(fmt.value_group, -1) * 2 ** -10 + 1e-7
    assert bool(((got_values - values).abs() <= value_step / 2 + value_slack)[used_slots.expand_as(values)].all())


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e6])
def test_non_finite_or_unscalable_input_is_refused(poison):
    quant = Quantization(PageFormat(4, 4, 32, 16, torch.float16), residual=0)
    keys = torch.randn(1, 1, 40, 16)
    keys[0, 0, 5, 3] = poison
    with pytest.raises(ValueError, match="NaN or inf|exceed"):
        QuantizedStore.from_padded(keys, torch.randn_like(keys), torch.arange(40).expand(1, 1, 40),
                                   torch.ones(1, 1, 40, dtype=torch.bool), quant)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from(BITS), group=st.sampled_from([32, 64]), residual=st.integers(0, 40),
       seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 2), heads=st.integers(1, 3))
def test_store_bytes_are_the_real_tensor_bytes_and_the_formula(bits, group, residual, seed, batch, heads):
    generator = torch.Generator().manual_seed(seed)
    n, dim = 150, 16
    keys = torch.randn(batch, heads, n, dim, generator=generator)
    keep = torch.rand(batch, heads, n, generator=generator) < torch.rand(batch, heads, 1, generator=generator)
    store = QuantizedStore.from_padded(keys, torch.randn_like(keys), torch.arange(n).expand(batch, heads, n), keep,
                                       Quantization(PageFormat(bits, bits, group, dim, torch.float16), residual))
    real = sum(t.numel() * t.element_size() for t in [*store.pages.tensors(), store.page_counts,
                                                      store.residual.keys, store.residual.values,
                                                      store.residual.positions, store.residual.lengths])
    assert store.nbytes == real == store.analytic_bytes()
    assert torch.equal(store.lengths, keep.sum(-1))


# --- Triton kernels vs the torch references ----------------------------------------------------------------
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="Triton kernels need the triton package (pip install kvpipe[triton])")


# The same tests run in Triton's interpreter on a CPU machine and compiled on a CUDA device (``pytest -m gpu``,
# which ``benchmarks/gpu_check.py`` runs first). Tolerances on ‖out − ref‖/‖ref‖ against an fp32 reference
# computed from the same stored codes, both rounded once to the output dtype. The interpreter computes in fp32
# whatever the input dtype: its 16-bit rows allow a few elements that straddle a rounding step and land one ulp
# apart (fp16 ulp 2^-11, bf16 2^-8; ~1.5e-5 and ~2e-5 seen over 2·8·128 outputs). Compiled dot operands are the
# query's dtype with fp32 accumulation.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {"cpu": {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 5e-4},
             "cuda": {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}}


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("key_bits,value_bits", [(2, 2), (4, 4), (8, 8), (4, 2), (2, 8)])
@pytest.mark.parametrize("group,dim,value_group", [(32, 16, 16), (64, 32, 16), (128, 64, 64), (128, 128, 128)])
def test_triton_quantize_and_pack_is_bit_exact(key_bits, value_bits, group, dim, value_group):
    from kvpipe.kernels.triton_quant import quantize_pages_triton

    seed = fresh_seed()
    generator = torch.Generator().manual_seed(seed)
    keys, values = torch.randn(3, group, dim, generator=generator) * 5, torch.randn(3, group, dim, generator=generator)
    keys[1] = keys[1, :1]                                                      # one constant page
    positions = torch.arange(3 * group, dtype=torch.int32).view(3, group)
    positions[-1, group // 2 + 3:] = -1                                        # a partly used page
    fmt = PageFormat(key_bits, value_bits, group, value_group, torch.float16)
    want = quantize_pages(keys, values, positions, fmt)
    got = quantize_pages_triton(keys.to(DEVICE), values.to(DEVICE), positions.to(DEVICE), fmt)
    for name, a, b in zip(("key_codes", "key_scale", "key_min", "value_codes", "value_scale", "value_min",
                           "positions", "used"), want.tensors(), got.tensors()):
        assert torch.equal(a, b.cpu()), f"{name} (seed {seed})"


def random_store(batch, kv_heads, n, dim, fmt, residual, keep_rate, dtype, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, kv_heads, n, dim, generator=generator).to(dtype)
    values = torch.randn(batch, kv_heads, n, dim, generator=generator).to(dtype)
    keep = torch.rand(batch, kv_heads, n, generator=generator) < keep_rate.view(batch, kv_heads, 1)
    return QuantizedStore.from_padded(keys.to(device), values.to(device), torch.arange(n).expand(batch, kv_heads, n)
                                      .to(device), keep.to(device), Quantization(fmt, residual))


FUSED_CASES = [
    # bits K/V, page size, value group, head dim, GQA group, residual, tail, splits (None: default), dtype
    dict(bits=(4, 4), group=32, vgroup=16, dim=32, gqa=3, residual=10, tail=5, splits=4, dtype=torch.float32),
    dict(bits=(2, 2), group=64, vgroup=16, dim=32, gqa=1, residual=0, tail=3, splits=1, dtype=torch.float32),
    dict(bits=(8, 8), group=32, vgroup=16, dim=32, gqa=4, residual=7, tail=0, splits=16, dtype=torch.float32),
    dict(bits=(4, 2), group=32, vgroup=16, dim=32, gqa=2, residual=33, tail=1, splits=2, dtype=torch.float16),
    dict(bits=(2, 8), group=32, vgroup=16, dim=32, gqa=3, residual=5, tail=2, splits=3, dtype=torch.bfloat16),
    # the shapes of real models: head dim 64 / 128 / 256, GQA 4 and 8, page 128 and 64, fp16 and bf16
    dict(bits=(4, 4), group=128, vgroup=64, dim=64, gqa=4, residual=0, tail=3, splits=None, dtype=torch.bfloat16),
    dict(bits=(4, 4), group=128, vgroup=128, dim=128, gqa=4, residual=0, tail=1, splits=None, dtype=torch.float16),
    dict(bits=(2, 2), group=64, vgroup=128, dim=128, gqa=8, residual=20, tail=2, splits=None, dtype=torch.bfloat16),
    dict(bits=(4, 4), group=64, vgroup=128, dim=256, gqa=2, residual=3, tail=1, splits=None, dtype=torch.bfloat16),
    # the edges: head dim 16 (key fields of 8 channels), GQA 8 and a group of 5 (padded to 8 rows), pages of 16
    dict(bits=(4, 4), group=32, vgroup=16, dim=16, gqa=8, residual=0, tail=2, splits=2, dtype=torch.float16),
    dict(bits=(2, 4), group=16, vgroup=16, dim=64, gqa=5, residual=4, tail=1, splits=5, dtype=torch.float32),
]


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: "K{}V{}-G{}-D{}-gqa{}-{}".format(
    *c["bits"], c["group"], c["dim"], c["gqa"], str(c["dtype"]).removeprefix("torch.")))
def test_fused_decode_attention_matches_the_reference(case):
    from kvpipe.kernels.attention_reference import decode_attention_reference
    from kvpipe.kernels.triton_decode import fused_decode_attention

    seed = fresh_seed()
    batch, kv_heads, n, dim, dtype = 2, 2, 300, case["dim"], case["dtype"]
    fmt = PageFormat(*case["bits"], case["group"], case["vgroup"], torch.float16)
    # Heads of very different lengths after eviction, one of them empty (residual-and-tail only).
    store = random_store(batch, kv_heads, n, dim, fmt, case["residual"], torch.tensor([0.9, 0.3, 0.0, 0.6]),
                         dtype, seed, DEVICE)
    generator = torch.Generator().manual_seed(seed + 1)
    tail_keys, tail_values = (torch.randn(batch, kv_heads, case["tail"], dim, generator=generator).to(DEVICE, dtype)
                              for _ in range(2))
    query = (torch.randn(batch, kv_heads * case["gqa"], 1, dim, generator=generator) * 2).to(DEVICE, dtype)
    poison = torch.full((batch, 1, kv_heads * case["gqa"], dim), float("nan"))
    got = fused_decode_attention(query, store.decode_operands, tail_keys, tail_values, 0.2, splits=case["splits"])
    assert got.dtype == dtype and got.shape == poison.shape
    keys, values, _ = store.padded(torch.float32)
    valid = torch.cat([store.valid(), torch.ones(batch, kv_heads, case["tail"], dtype=torch.bool, device=DEVICE)], -1)
    want = decode_attention_reference(query.float(), torch.cat([keys, tail_keys.float()], 2),
                                      torch.cat([values, tail_values.float()], 2), valid, 0.2)
    got, want = got.float().cpu(), want.to(dtype).float().cpu()          # both rounded once to the output dtype
    assert bool(torch.isfinite(got).all()), f"seed {seed}"
    error = float((got - want).norm() / want.norm())
    assert error < TOLERANCE[DEVICE][dtype], f"relative error {error:.2e} (seed {seed})"


@needs_triton
@pytest.mark.parametrize("bits", [(4, 4), (2, 2), (8, 4)])
def test_the_fp16_offset_and_its_correction_hold_in_the_interpreter(monkeypatch, bits):
    """Compiled for 16-bit queries, codes reach the dots as fp16 ``1024 + 2^(bits·j)·code`` and the kernel subtracts
    the offset's share in fp32. The interpreter normally takes integer operands; here it runs the offset path (plain
    operations, fp32 dots), so the correction terms are checked on every CI run, not only on a GPU. The offset costs
    fp32 cancellation (1024 against int2 codes of 0 to 3: ~1.5e-4 measured), hence 5e-4 instead of 1e-5; a wrong
    correction term is off by far more (the offset's share alone is ~340 times the signal)."""
    from kvpipe.kernels import triton_decode
    from kvpipe.kernels.attention_reference import decode_attention_reference

    if not triton_decode.interpreting():
        pytest.skip("compiled runs take the offset path already (test_fused_decode_attention_matches_the_reference)")
    monkeypatch.setattr(triton_decode, "dot_dtypes", lambda dtype: (tl.float32, tl.float32, "ieee", 1024))
    seed = fresh_seed()
    store = random_store(2, 2, 300, 64, PageFormat(*bits, 64, 32, torch.float16), 5,
                         torch.tensor([1.0, 0.4, 0.8, 0.6]), torch.float32, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(2, 8, 1, 64, generator=generator) * 3
    tail = torch.randn(2, 2, 2, 64, generator=generator)
    got = triton_decode.fused_decode_attention(query, store.decode_operands, tail, tail, 0.125, splits=2)
    keys, values, _ = store.padded(torch.float32)
    valid = torch.cat([store.valid(), torch.ones(2, 2, 2, dtype=torch.bool)], -1)
    want = decode_attention_reference(query, torch.cat([keys, tail], 2), torch.cat([values, tail], 2), valid, 0.125)
    error = float((got - want).norm() / want.norm())
    assert error < 5e-4, f"relative error {error:.2e} (seed {seed})"


@needs_triton
@pytest.mark.gpu
def test_one_launch_merges_and_leaves_its_arrival_counters_at_zero():
    """The last program of each KV head merges the splits in the same launch and resets the head's counter, so the
    store's workspace serves the next step (and a CUDA graph replay) as it is: repeated calls, with another split
    count in between, give the same output each time."""
    from kvpipe.kernels.triton_decode import fused_decode_attention

    seed = fresh_seed()
    fmt = PageFormat(4, 4, 32, 16, torch.float16)
    store = random_store(2, 2, 200, 32, fmt, 3, torch.tensor([0.9, 0.5, 0.7, 1.0]), torch.float32, seed, DEVICE)
    generator = torch.Generator().manual_seed(seed + 1)
    query = torch.randn(2, 8, 1, 32, generator=generator).to(DEVICE)
    tail = torch.randn(2, 2, 1, 32, generator=generator).to(DEVICE)
    first = fused_decode_attention(query, store.decode_operands, tail, tail, 0.2, splits=3)
    arrivals = store.decode_operands.workspace.buffers[2]
    assert arrivals.shape == (4,) and not bool(arrivals.any())
    other = fused_decode_attention(query, store.decode_operands, tail, tail, 0.2, splits=1)
    again = fused_decode_attention(query, store.decode_operands, tail, tail, 0.2, splits=3)
    assert torch.equal(first, again), f"seed {seed}"
    assert float((first - other).norm() / first.norm()) < 1e-5
    assert not bool(store.decode_operands.workspace.buffers[2].any())


def test_quantized_attention_error_against_unquantized_is_bounded():
    """Regression guard on Gaussian data: quantization error of the attention output, not kernel error."""
    from kvpipe.kernels.attention_reference import decode_attention_reference

    torch.manual_seed(0)
    batch, kv_heads, n, dim = 1, 2, 256, 32
    keys, values = torch.randn(batch, kv_heads, n, dim), torch.randn(batch, kv_heads, n, dim)
    query = torch.randn(batch, 4, 1, dim)
    everything = torch.ones(batch, kv_heads, n, dtype=torch.bool)
    exact = decode_attention_reference(query, keys, values, everything, dim ** -0.5)
    # Measured on this seed: 0.0071 / 0.131 / 0.666 (values averaged over 256 tokens shrink the output, so the
    # relative error is larger than at head dim 128). An attention that ignores the keys (uniform
    # weights) is 0.865 off: every bound must reject it.
    bound = {8: 0.011, 4: 0.2, 2: 0.75}
    uniform = decode_attention_reference(query, torch.zeros_like(keys), values, everything, dim ** -0.5)
    assert float((uniform - exact).norm() / exact.norm()) > max(bound.values())
    for bits, limit in bound.items():
        store = QuantizedStore.from_padded(keys, values, torch.arange(n).expand(batch, kv_heads, n), everything,
                                           Quantization(PageFormat(bits, bits, 32, 32, torch.float16), 0))
        k, v, _ = store.padded()
        approx = decode_attention_reference(query, k, v, store.valid(), dim ** -0.5)
        assert float((approx - exact).norm() / exact.norm()) < limit, bits


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", [((2, 3, 150, 16), torch.float32), ((1, 2, 70), torch.int32),
                                         ((2, 2, 40, 200), torch.bfloat16)])
def test_triton_compaction_is_bit_exact(shape, dtype):
    from kvpipe.kernels.ragged import pack_ragged
    from kvpipe.kernels.triton_compact import pack_ragged_triton

    data = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.randint(-9, 9, shape, dtype=dtype)
    heads = shape[0] * shape[1]
    rates = torch.tensor([0.5, 0.0, 1.0, 0.2, 0.7, 0.9])[:heads].view(shape[0], shape[1], 1)  # empty and full heads
    keep = torch.rand(shape[:3]) < rates
    assert torch.equal(pack_ragged_triton(data.to(DEVICE), keep.to(DEVICE)).cpu(), pack_ragged(data, keep))


if importlib.util.find_spec("triton") is not None:        # a kernel around the decode kernel's unpack helper
    import triton
    import triton.language as tl

    from kvpipe.kernels.triton_unpack import fields

    @triton.jit
    def _unpack_kernel(src, out, R: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr,
                       DOT: tl.constexpr, ASM: tl.constexpr):
        rows, cols = tl.arange(0, R), tl.arange(0, N)
        tiles = fields(tl.load(src + rows[:, None] * N + cols[None, :]), BITS, OFFSET, DOT, ASM)
        for j in tl.static_range(8 // BITS):
            tl.store(out + (j * R + rows)[:, None] * N + cols[None, :], tiles[j].to(tl.float32))


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["fp16 bit trick", "integer conversion"])
def test_unpacked_fields_are_exact(bits, mode):
    """The decode kernel's unpack, bytes to dot operands: field j of a byte tile ``[R, N]`` (packed along R) is the
    slice ``j·R .. (j+1)·R`` of the codes, kept in place (times ``2^(bits·j)``), plus the fp16 offset 1024 in the
    bit trick. Compiled on a GPU the trick runs as inline PTX; in the interpreter with the same numerics in plain
    operations."""
    offset = 1024 if mode == "fp16 bit trick" else 0
    dot = tl.float16 if offset and DEVICE == "cuda" else tl.float32
    generator = torch.Generator().manual_seed(fresh_seed())
    rows, cols = 8, 16
    codes = torch.randint(0, 2 ** bits, (cols, rows * 8 // bits), generator=generator, dtype=torch.int32)
    src = pack_codes(codes, bits).T.contiguous().to(DEVICE)                   # bytes [rows, cols], rows packed
    step = (2 ** (bits * (torch.arange(rows * 8 // bits) // rows))).float()   # field j of row r: element r + j·R
    want = codes.T.float() * step[:, None] + offset
    got = torch.full((rows * 8 // bits, cols), float("nan"), device=DEVICE)
    _unpack_kernel[(1,)](src, got, rows, cols, bits, offset, dot, DEVICE == "cuda" and offset > 0)
    assert torch.equal(got.cpu(), want)
