"""One launch of the fused decode kernel between ``cudaProfilerStart``/``Stop``, for Nsight Compute; or, with
``--host-profile N``, where the host time of N back-to-back calls goes (cProfile, by own time).

Llama-3.1-8B's attention shape, a 4-bit cache as the shipped ``int4`` stores it. Tuning and compiling happen
before the profiled launch, so ``ncu --profile-from-start off`` sees exactly one kernel of interest:

    ncu --clock-control none --profile-from-start off --set detailed \\
        python benchmarks/decode_kernel_once.py --context 32768 --batch 8
    python benchmarks/decode_kernel_once.py --context 4096 --batch 1 --host-profile 300
"""
from __future__ import annotations

import argparse
import dataclasses

import torch

import kvpipe
from kvpipe.kernels.triton_decode import _decode_kernel, fused_decode_attention
from kvpipe.runtime.quantized_store import QuantizedStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pipeline", default="int4", help="a shipped pipeline with a quantize stage")
    parser.add_argument("--host-profile", type=int, metavar="N", help="profile N calls on the host instead")
    args = parser.parse_args()
    q_heads, kv_heads, dim = 32, 8, 128
    quant = dataclasses.replace(kvpipe.build(args.pipeline).storage_stage.storage(dim), backend="triton")
    shape = (args.batch, kv_heads, args.context, dim)
    keys, values = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    positions = torch.arange(args.context, device="cuda").expand(shape[:3])
    store = QuantizedStore.from_padded(keys, values, positions, torch.ones(shape[:3], dtype=torch.bool,
                                                                           device="cuda"), quant)
    query = torch.randn(args.batch, q_heads, 1, dim, device="cuda", dtype=torch.bfloat16)
    empty = keys[:, :, :0]

    def launch():
        return fused_decode_attention(query, store.decode_operands, empty, empty, dim ** -0.5)
    for _ in range(3):                                     # compile, tune, warm
        launch()
    torch.cuda.synchronize()
    if args.host_profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.host_profile):
            launch()
        profile.disable()
        torch.cuda.synchronize()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
        return
    torch.cuda.cudart().cudaProfilerStart()
    launch()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one launch: {store.nbytes / 1e6:.0f} MB of 4-bit cache, batch {args.batch}, "
          f"{args.context} tokens; tuned: {getattr(_decode_kernel, 'best_config', None)}")


if __name__ == "__main__":
    main()
