"""``gpu_check.py``'s launch-cost part: what one kernel launch costs the host on this machine, by kind of launch.

At batch 1 a decode step is host-bound, and kvpipe's fused decode costs two Triton launches of 24 arguments per
layer. This measures, back to back, a torch kernel, Triton kernels of 1 and of 24 tensor arguments, and kvpipe's
fused decode call, so the levers (fewer launches, fewer arguments) can be priced before they are built.
Imported by ``gpu_check.py``, which sets ``TRITON_INTERPRET`` for ``--tiny`` before this module's kernels load."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from timing import back_to_back


@triton.jit
def _one_argument(out):
    tl.store(out + tl.program_id(0), 1.0)


@triton.jit
def _many_arguments(out, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
                    a20, a21, a22, a23):
    tl.store(out + tl.program_id(0), 1.0)


def launch_costs(device: torch.device, fused_call, calls: int = 1000) -> list[dict]:
    """µs per call of ``calls`` launches issued back to back (host-bound: each kernel does nearly nothing).
    ``fused_call``: one kvpipe fused decode call at a small shape."""
    out = torch.zeros(16, device=device)
    others = [torch.zeros(16, device=device) for _ in range(23)]
    calls = calls if device.type == "cuda" else 2
    launches = {"torch: out.add_(1), one kernel": lambda: out.add_(1),
                "Triton kernel, 1 tensor argument": lambda: _one_argument[(1,)](out),
                "Triton kernel, 24 tensor arguments": lambda: _many_arguments[(1,)](out, *others),
                "kvpipe fused decode (2 Triton launches + kvpipe's Python)": fused_call}
    return [{"launch": name, "us back to back": 1e6 * back_to_back(device, fn, calls)}
            for name, fn in launches.items()]
