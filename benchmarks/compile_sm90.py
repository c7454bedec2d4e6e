"""Compile kvpipe's fused decode kernel for a GPU that is not here, and read what the compiler made of it.

No GPU and no driver are needed: Triton compiles for a named target (``--arch 90``: Hopper) and its package ships
``cuobjdump``. For each configuration this prints the registers, spilled bytes (stack), shared memory, and the
instruction mix of the main loop (the longest backward branch of the SASS) per token and KV head. Install the
GPU image's Triton version in a side environment to see what that machine will build (the IR changes between
releases). Pointer arguments are declared 16-byte aligned, as a launch with fresh torch tensors specialises them.

    python benchmarks/compile_sm90.py                       # int4 as shipped, bf16, head dim 128, GQA 4
    python benchmarks/compile_sm90.py --bits 2 --group 32 --dim 64
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvpipe.kernels.pages import PageFormat
from kvpipe.kernels.triton_decode import _CONFIGS, _decode_split_kernel, code_offsets

POINTERS = {"q": "*bf16", "key_bytes": "*u8", "key_scale": "*fp16", "key_min": "*fp16", "value_bytes": "*u8",
            "value_scale": "*fp16", "value_min": "*fp16", "page_pos": "*i32", "page_start": "*i32",
            "page_count": "*i32", "res_keys": "*bf16", "res_values": "*bf16", "res_start": "*i32", "res_len": "*i32",
            "tail_keys": "*bf16", "tail_values": "*bf16", "mid_o": "*fp32", "mid_lse": "*fp32"}
SCALARS = {"tail_len": "i32", "qk_scale": "fp32", "work_class": "i32"}


def loop_mix(sass: str) -> collections.Counter:
    """Opcode counts inside the longest backward branch (the page loop)."""
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)]
    loops = [(int(t.group(1), 16), at) for at, text in lines if (t := re.search(r"BRA (0x[0-9a-f]+)", text))
             and int(t.group(1), 16) < at]
    start, end = max(loops, key=lambda span: span[1] - span[0])
    opcode = re.compile(r"^(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
    return collections.Counter(opcode.match(text).group(1) for at, text in lines if start <= at <= end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: H100/H200)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128, help="tokens per page")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--gqa", type=int, default=4, help="query heads per KV head")
    parser.add_argument("--configs", type=int, help="compile only the first N autotuning configurations")
    args = parser.parse_args()
    fmt = PageFormat(args.bits, args.bits, args.group, min(args.group, args.dim), None)
    names = list(inspect.signature(_decode_split_kernel.fn.fn).parameters)
    signature = {**POINTERS, **SCALARS}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in POINTERS}
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    print(f"Triton {triton.__version__}, sm_{args.arch}: {args.bits}-bit pages of {args.group}, head dim {args.dim}, "
          f"GQA {args.gqa}, bf16 queries")
    for config in _CONFIGS[:args.configs]:
        constants = dict(GROUP=args.gqa, BLOCK_H=max(16, triton.next_power_of_2(args.gqa)), D=args.dim, G=args.group,
                         GV=fmt.value_group, KBITS=args.bits, VBITS=args.bits, NS=32, DOT=tl.bfloat16,
                         PRECISION="tf32", SPLIT_Q=True, **code_offsets(tl.bfloat16, fmt), **config.kwargs)
        source = ASTSource(_decode_split_kernel.fn, {**signature, **{k: "constexpr" for k in constants}},
                           constexprs=constants, attrs=attrs)
        options = {k: v for k, v in config.all_kwargs().items() if k in ("num_warps", "num_stages", "maxnreg")}
        compiled = triton.compile(source, target=GPUTarget("cuda", args.arch, 32), options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([f"{bindir}/cuobjdump", "-res-usage", cubin.name], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([f"{bindir}/cuobjdump", "-sass", cubin.name], capture_output=True, text=True,
                                  check=True).stdout
        mix = loop_mix(sass)
        tile = min(config.kwargs["BLOCK_N"], args.group)
        per_token = sum(mix.values()) * config.num_warps / tile
        top = ", ".join(f"{op} {n}" for op, n in mix.most_common(6))
        registers, stack = (re.search(rf"{field}:(\d+)", usage).group(1) for field in ("REG", "STACK"))
        print(f"{str(config):<90} registers {registers:>3}  stack {stack:>4}  shared {compiled.metadata.shared:>6}  "
              f"loop {per_token:5.1f} warp instructions per token ({top})")


if __name__ == "__main__":
    main()
