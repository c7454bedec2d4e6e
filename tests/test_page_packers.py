"""The page-packer registry: which handler packs a format, and that a registered handler is the one a store uses."""
from __future__ import annotations

import torch

from kvpipe.core.quantization import Quantization
from kvpipe.kernels.pages import PageFormat, quantize_pages
from kvpipe.runtime import page_packers
from kvpipe.runtime.page_packers import page_packer, register_page_packer
from kvpipe.runtime.quantized_store import QuantizedStore

from conftest import fresh_seed

FP16 = PageFormat(4, 4, 32, 32, torch.float16)
BF16 = PageFormat(4, 4, 32, 32, torch.bfloat16)


def test_the_reference_packs_what_no_handler_accepts():
    assert page_packer("kivi", "torch", FP16) is quantize_pages
    assert page_packer("hqq", "triton", FP16) is quantize_pages          # the Triton kernel knows min/max only
    assert page_packer("kivi", "triton", BF16) is quantize_pages         # ... and float16 scales only
    assert page_packer("kivi", "triton", FP16) is not quantize_pages


def test_a_registered_handler_packs_the_store(monkeypatch):
    monkeypatch.setattr(page_packers, "_HANDLERS", dict(page_packers._HANDLERS))
    calls = []

    def counting(keys, values, positions, fmt, group_range):
        calls.append(keys.shape)
        return quantize_pages(keys, values, positions, fmt, group_range)

    register_page_packer("kivi", "mine", counting)
    generator = torch.Generator().manual_seed(fresh_seed())
    keys, values = torch.randn(2, 2, 80, 64, generator=generator), torch.randn(2, 2, 80, 64, generator=generator)
    positions = torch.arange(80).expand(2, 2, 80)
    keep = torch.rand(2, 2, 80, generator=generator) < 0.7
    mine = QuantizedStore.from_padded(keys, values, positions, keep, Quantization(FP16, residual=8, backend="mine"))
    reference = QuantizedStore.from_padded(keys, values, positions, keep, Quantization(FP16, residual=8))
    assert calls, "the registered handler was not called"
    for got, want in zip(mine.padded(), reference.padded()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
