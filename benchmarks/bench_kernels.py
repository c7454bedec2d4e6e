"""Kernel benchmark: decode attention over packed pages, quantize-and-pack, and compaction.

Per configuration (context × bits × group × batch × per-head lengths): median time, the bytes the kernel
must move, achieved GB/s, and the baselines — dense SDPA decode (fp16 on GPU) over as many unquantized tokens and the
unfused "dequantize everything, then SDPA" path (what transformers' QuantizedCache does).

On a CUDA device it times the Triton kernels with ``triton.testing.do_bench`` (L2 flushed between runs) and
measures the device-to-device copy bandwidth in the same run, reporting each kernel as a % of it.
On CPU it times the torch path (dequantize, then attend) and says so: Triton's interpreter is for tests only.

Examples:
    python benchmarks/bench_kernels.py                         # the default sweep for this device
    python benchmarks/bench_kernels.py --contexts 4096 --bits 4 --batches 1
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import copy_bandwidth, timer
from tqdm.auto import tqdm

from kvpipe.core.quantization import Quantization
from kvpipe.core.table import render
from kvpipe.kernels.pages import PageFormat
from kvpipe.runtime.quantized_store import QuantizedStore


def make_store(batch, kv_heads, context, dim, fmt, residual, skewed, dtype, device) -> QuantizedStore:
    keys = torch.randn(batch, kv_heads, context, dim, dtype=dtype, device=device)
    values = torch.randn_like(keys)
    # skewed: what global eviction leaves behind — head h keeps (h+1)/H of the tokens
    rates = (torch.arange(kv_heads, device=device) + 1) / kv_heads if skewed else torch.ones(kv_heads, device=device)
    keep = torch.rand(batch, kv_heads, context, device=device) < rates.view(1, kv_heads, 1)
    positions = torch.arange(context, device=device).expand(batch, kv_heads, context)
    return QuantizedStore.from_padded(keys, values, positions, keep, Quantization(fmt, residual))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768] if cuda else [1024, 4096])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--groups", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8] if cuda else [1])
    parser.add_argument("--kv-heads", type=int, default=8 if cuda else 3)
    parser.add_argument("--q-heads", type=int, default=32 if cuda else 9)
    parser.add_argument("--head-dim", type=int, default=128 if cuda else 64)
    parser.add_argument("--residual", type=int, default=128)
    args = parser.parse_args()

    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    time_it = timer(device)
    peak = copy_bandwidth(device, time_it) if cuda else None
    if cuda:
        from kvpipe.kernels.triton_compact import pack_ragged_triton
        from kvpipe.kernels.triton_decode import fused_decode_attention
        from kvpipe.kernels.triton_quant import quantize_pages_triton
    rows = []
    sweep = [(c, b, g, n, s) for c in args.contexts for b in args.bits for g in args.groups for n in args.batches
             for s in (False, True)]
    for context, bits, group, batch, skewed in tqdm(sweep, desc="configurations"):
        fmt = PageFormat(bits, bits, group, min(group, args.head_dim), torch.float16)
        store = make_store(batch, args.kv_heads, context, args.head_dim, fmt, args.residual, skewed, dtype, device)
        kept = int(store.lengths.sum())
        query = torch.randn(batch, args.q_heads, 1, args.head_dim, dtype=dtype, device=device)
        empty = torch.zeros(batch, args.kv_heads, 0, args.head_dim, dtype=dtype, device=device)
        scale = args.head_dim ** -0.5
        # baselines: dense SDPA (fp16 on GPU) over as many tokens, and dequantize-everything-then-SDPA
        dense = torch.randn(batch, args.kv_heads, kept // (batch * args.kv_heads), args.head_dim, dtype=dtype,
                            device=device)
        t_dense = time_it(lambda: F.scaled_dot_product_attention(query, dense, dense, scale=scale, enable_gqa=True))
        keys, values = store.attend(empty, empty)
        mask = store.valid()[:, :, None].repeat_interleave(args.q_heads // args.kv_heads, 1)

        def unfused():
            k, v = store.attend(empty, empty)
            return F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        t_unfused = time_it(unfused)
        moved = store.nbytes + 2 * query.nbytes            # what an ideal kernel reads and writes
        row = [context, bits, group, batch, "skewed" if skewed else "uniform", kept, moved / 2 ** 20,
               t_dense * 1e6, t_unfused * 1e6]
        if cuda:
            t_fused = time_it(lambda: fused_decode_attention(query, store.decode_operands, empty, empty, scale))
            page_keys = torch.randn(store.pages.count, group, args.head_dim, device=device, dtype=dtype)
            page_values, page_positions = torch.randn_like(page_keys), store.pages.positions
            t_quant = time_it(lambda: quantize_pages_triton(page_keys, page_values, page_positions, fmt))
            keep = torch.rand(batch, args.kv_heads, keys.shape[2], device=device) < 0.5
            t_compact = time_it(lambda: pack_ragged_triton(keys, keep))
            row += [t_fused * 1e6, moved / t_fused / 1e9, 100 * moved / t_fused / peak, t_unfused / t_fused,
                    t_dense / t_fused, t_quant * 1e6, t_compact * 1e6]
        else:
            row += [moved / t_unfused / 1e9]
        rows.append(row)
    headers = ["context", "bits", "group", "batch", "head lengths", "kept tokens", "MiB to move", "dense SDPA us",
               "dequant+SDPA us"]
    if cuda:
        name = torch.cuda.get_device_name()
        print(f"{name}; measured copy bandwidth {peak / 1e9:.0f} GB/s; torch {torch.__version__}; fp16 q/residual")
        headers += ["fused us", "fused GB/s", "% of copy BW", "x vs dequant+SDPA", "x vs dense SDPA",
                    "quantize-pack us", "compact us"]
    else:
        print(f"CPU ({torch.get_num_threads()} threads), torch path only: dequantize into the attention buffer, then "
              "SDPA. The fused Triton kernels need a CUDA device (their numerics are tested in the interpreter).")
        headers += ["dequant+SDPA GB/s"]
    print(render(headers, rows))


if __name__ == "__main__":
    main()
