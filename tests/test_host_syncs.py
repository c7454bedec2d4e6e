"""A decode step over a compressed cache must not make the host wait for the device.

On a GPU, reading a tensor's value on the host (``int(t)``, ``bool(t)``, ``t.item()``, ``nonzero``, indexing
with a boolean mask) waits until every queued kernel has run: at batch 1 decode is host-bound, so one such wait
per layer per step costs more than the attention itself. On a CPU-only machine the waits are free and invisible,
so the counter below finds them by the operators that cause them, and names kvpipe's line. Every shipped
pipeline then decodes under it, on both backends (``triton``, a GPU's default, here in Triton's interpreter),
after a compressing prefill of a padded batch. A store is immutable, so what it must read of its own shape (its width,
its slot layout) it reads once, at the first step over it; the steps after that must read nothing.
"""
from __future__ import annotations

import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvpipe.core.shipped import names

from conftest import left_padded_batch, refuses_rotated_codes, shipped_pipeline, tiny_model

ROOT = Path(__file__).resolve().parents[1]
OWN_CODE = tuple(str(ROOT / folder) + "/" for folder in ("kvpipe", "stages", "kernels"))
aten = torch.ops.aten
READS_A_VALUE = {aten.item.default, aten.is_nonzero.default, aten._local_scalar_dense.default, aten.nonzero.default,
                 aten.masked_select.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}


class HostSyncs(TorchDispatchMode):
    """Records where kvpipe's code (``kvpipe/``, ``stages/``, ``kernels/``) makes an operator that reads a value
    on the host or sizes its output by the data (boolean-mask indexing). Calls from torch, transformers or the
    tests are not kvpipe's and are not recorded."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                          for i in (args[1] if len(args) > 1 else None) or ())
        if func in READS_A_VALUE or masked:
            own = [f for f in traceback.extract_stack() if str(Path(f.filename).resolve()).startswith(OWN_CODE)]
            if own:
                self.found.append(f"{func} at {Path(own[-1].filename).resolve().relative_to(ROOT)}:{own[-1].lineno}")
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_every_kind_of_host_read():
    """The counter itself, on code compiled as if it were kvpipe's: each way of reading a value is recorded."""
    code = compile("(int(x.max()), bool((x > 1).all()), x.nonzero(), x[x > 1], x.masked_select(x > 1))",
                   str(ROOT / "kvpipe" / "sync_probe.py"), "eval")
    x = torch.tensor([3.0, 0.5, 2.0])
    with HostSyncs() as syncs:
        eval(code, {"x": x})
        x.nonzero()                                   # the test's own call is not kvpipe's
    assert len(syncs.found) == 5 and all("kvpipe/sync_probe.py:1" in where for where in syncs.found)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", names())
def test_decode_steps_make_no_host_sync(name, backend, tmp_path):
    """``torch``: quantized stores laid out for SDPA each step; ``triton``: the fused kernel reads them."""
    if backend == "triton":
        pytest.importorskip("triton")
    pipeline = shipped_pipeline(name, tmp_path, backend=backend)
    model = tiny_model()
    if refuses_rotated_codes(pipeline, model):
        return
    ids, mask = left_padded_batch(11)
    with pipeline.attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(ids, attention_mask=mask, past_key_values=cache)
        assert any(layer.store is not None for layer in cache.layers) or not pipeline.compresses
        token = ids[:, -1:]
        syncs = HostSyncs()
        for step in range(4):                        # fewer than a page: no flush, no decode-time compression
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            # the first step reads each new store's shape once (width, layout: one sync each, cached after)
            with syncs if step else torch.inference_mode():
                model(token, attention_mask=mask, past_key_values=cache)
    assert syncs.found == [], "\n".join(syncs.found[:5])
