"""Rotated low-bit codes (``quantize: {rotate: hadamard}``): tokens stored as ``x R`` with ``R`` an orthogonal
randomized Hadamard matrix, turned back with ``Rᵀ`` when read."""
from __future__ import annotations

import pytest
import torch

import kvpipe
from kvpipe import UnsupportedModelError
from kvpipe.kernels.rotation import randomized_hadamard
from kvpipe.runtime.quantized_store import dequantized, pack_pages
from kvpipe.stages.quantize import Quantize, QuantizeParams

from conftest import fresh_seed, tiny_model


@pytest.mark.parametrize("dim", [1, 2, 16, 64, 128])
def test_the_rotation_is_orthogonal_and_seeded(dim):
    rotation = randomized_hadamard(dim, 3)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(dim), rtol=0, atol=1e-6)
    assert torch.equal(rotation, randomized_hadamard(dim, 3))
    assert dim < 4 or not torch.equal(rotation, randomized_hadamard(dim, 4))      # the seed draws the signs


def test_a_head_dimension_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(ValueError, match="power-of-two"):
        randomized_hadamard(48, 0)
    with pytest.raises(kvpipe.KVPipeError, match="rotate: hadamard needs a power-of-two head dimension"):
        Quantize(QuantizeParams(bits=2, group_size=32, rotate="hadamard")).storage(96)


def pages_error(rotate: str, keys: torch.Tensor, values: torch.Tensor, bits: int) -> tuple[float, float]:
    """Relative error (Frobenius) of the keys and of the values read back from pages of ``bits``-bit codes."""
    quant = Quantize(QuantizeParams(bits=bits, group_size=32, rotate=rotate)).storage(keys.shape[-1])
    positions = torch.arange(keys.shape[1], dtype=torch.int32).expand(keys.shape[0], -1)
    back = dequantized(pack_pages(quant, keys, values, positions), quant, torch.float32)
    return float((back[0] - keys).norm() / keys.norm()), float((back[1] - values).norm() / values.norm())


def test_rotated_codes_read_back_what_was_stored_within_8_bit_rounding():
    generator = torch.Generator().manual_seed(fresh_seed())
    keys, values = (torch.randn(6, 32, 64, generator=generator) for _ in range(2))
    assert max(pages_error("hadamard", keys, values, bits=8)) < 0.01      # 8 bits: ~0.4 % of the norm


def test_rotation_spreads_an_outlier_channel_and_2_bit_values_lose_less():
    """The reason to rotate: a channel 20x larger than the rest widens every per-token value group; rotated, its
    energy is spread over all channels (values: 0.45 -> 0.31 of the norm over seeds 0-3). Keys are grouped per
    channel (KIVI), where an outlier widens only its own group: rotation leaves them about as they were."""
    generator = torch.Generator().manual_seed(fresh_seed())
    keys, values = (torch.randn(8, 32, 64, generator=generator) for _ in range(2))
    keys[..., 5] *= 20
    values[..., 9] *= 20
    (plain_keys, plain_values), (keys_rotated, values_rotated) = (pages_error(r, keys, values, 2)
                                                                  for r in ("none", "hadamard"))
    assert values_rotated < 0.8 * plain_values, (values_rotated, plain_values)
    assert keys_rotated < 1.15 * plain_keys, (keys_rotated, plain_keys)


def test_a_rotated_int2_pipeline_generates_and_refuses_the_fused_kernels(monkeypatch, random_ids):
    model = tiny_model()
    ids = random_ids(1, 300)
    with kvpipe.build("int2-rotated").attach(model) as handle:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert handle.stats().compression_ratio > 1.5
    assert out.shape == (1, 304)
    import kvpipe.runtime.attach as attach

    monkeypatch.setattr(attach, "resolve_backend", lambda *args: "triton")
    with pytest.raises(UnsupportedModelError, match="rotated codes.*backend: torch"):
        kvpipe.build("int2-rotated").attach(model)
