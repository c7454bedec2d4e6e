"""Every tensor kvpipe creates must be made on the device of the data it serves.

On a CPU-only machine a forgotten ``device=`` is invisible: everything is on the CPU anyway, and the first CUDA
user hits ``Expected all tensors to be on the same device``. The trap makes the mistake loud here: while it is
on, any factory call (``torch.zeros``, ``arange``, ``full``, ...) made **from kvpipe's own code** without a
``device`` argument fails, naming the file and line. Every shipped pipeline then runs end to end through
``generate()`` under the trap.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from kvpipe.core.shipped import names

from conftest import left_padded_batch, refuses_rotated_codes, shipped_pipeline, tiny_model

ROOT = Path(__file__).resolve().parents[1]
OWN_CODE = tuple(str(ROOT / folder) + "/" for folder in ("kvpipe", "stages", "kernels"))
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.eye, torch.tensor, torch.rand,
             torch.randn, torch.randint, torch.linspace}


class DeviceTrap(TorchFunctionMode):
    """Fails any factory call without ``device=`` whose caller is kvpipe's code (``kvpipe/``, ``stages/``,
    ``kernels/``); calls from torch, transformers or the tests pass."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)
            where = str(Path(caller.f_code.co_filename).resolve())
            if where.startswith(OWN_CODE):
                raise AssertionError(f"torch.{func.__name__} without device= at "
                                     f"{Path(where).relative_to(ROOT)}:{caller.f_lineno}")
        return func(*args, **kwargs)


def test_the_trap_catches_a_factory_without_device():
    """The trap itself: a factory call made from a kvpipe file without ``device=`` fails, one with it passes."""
    code = compile("torch.zeros(3)", str(ROOT / "kvpipe" / "trap_probe.py"), "eval")
    with DeviceTrap():
        with pytest.raises(AssertionError, match=r"torch.zeros without device= at kvpipe/trap_probe.py:1"):
            eval(code, {"torch": torch})
        assert eval(compile("torch.zeros(3, device='cpu')", str(ROOT / "kvpipe" / "p.py"), "eval"),
                    {"torch": torch}).shape == (3,)
        torch.zeros(3)                               # the tests' own calls are not kvpipe's


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", names())
def test_every_shipped_pipeline_runs_under_the_device_trap(name, backend, tmp_path):
    """``triton`` runs the kernels' wrappers too (compaction, quantize-and-pack, fused decode) in the interpreter."""
    if backend == "triton":
        pytest.importorskip("triton")
    pipeline = shipped_pipeline(name, tmp_path, backend=backend)
    model = tiny_model()
    if refuses_rotated_codes(pipeline, model):
        return
    ids, mask = left_padded_batch(7)
    with pipeline.attach(model) as handle, DeviceTrap():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        stats = handle.stats()
    assert out.shape == (2, 306)
    assert stats["kv_bytes"] > 0 and stats["kept_tokens"].shape[:2] == (2, 2)
