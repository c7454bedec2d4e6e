"""``gpu_check.py``'s decode-attention microbenchmark: one decode step at an attention shape, kvpipe's fused int4 and
int2 kernels beside SDPA over a full bf16 cache, kvpipe's torch path and transformers' ``QuantizedCache``.
Imported by ``gpu_check.py``, which sets ``TRITON_INTERPRET`` for ``--tiny`` before this module's kernels load."""
from __future__ import annotations

import dataclasses
import importlib.util

import torch
import torch.nn.functional as F
from gpu_shapes import Sizes
from timing import back_to_back, graph_replay
from tqdm.auto import tqdm

import kvpipe
from kvpipe.kernels.triton_decode import _decode_kernel, default_splits, fused_decode_attention
from kvpipe.runtime.quantized_store import QuantizedStore, Workspace


def quantization_of(name: str, head_dim: int):
    """The storage a shipped pipeline asks for (so the benchmark measures exactly what ``int4`` ships)."""
    return kvpipe.build(name).storage_stage.storage(head_dim)


def hqq_quantized_cache(sizes: Sizes, batch: int, keys: torch.Tensor, values: torch.Tensor):
    """transformers' ``QuantizedCache`` (HQQ, 4 bits) holding ``keys``/``values``, or why it cannot be built."""
    if importlib.util.find_spec("hqq") is None:
        return None, "hqq is not installed on this machine"
    from transformers import LlamaConfig, QuantizedCache

    config = LlamaConfig(num_hidden_layers=1, num_attention_heads=sizes.q_heads, num_key_value_heads=sizes.kv_heads,
                         head_dim=sizes.head_dim, hidden_size=sizes.q_heads * sizes.head_dim)
    cache = QuantizedCache(backend="hqq", config=config, nbits=4, residual_length=128)
    cache.update(keys, values, 0)
    return cache, None


SPLIT_SWEEP = (0.5, 1, 2)        # times default_splits: whether the heuristic sits near the best count


def fused_decode_call(sizes: Sizes, device: torch.device, context: int):
    """One kvpipe fused decode call over a shipped ``int4`` store of ``context`` tokens, batch 1 (no arguments)."""
    shape = (1, sizes.kv_heads, context, sizes.head_dim)
    keys, values = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(2))
    positions = torch.arange(context, device=device).expand(shape[:3])
    quant = dataclasses.replace(quantization_of("int4", sizes.head_dim), backend="triton")
    store = QuantizedStore.from_padded(keys, values, positions, torch.ones(shape[:3], dtype=torch.bool,
                                                                           device=device), quant)
    query = torch.randn(1, sizes.q_heads, 1, sizes.head_dim, device=device, dtype=torch.bfloat16)
    empty = keys[:, :, :0]
    return lambda: fused_decode_attention(query, store.decode_operands, empty, empty, sizes.head_dim ** -0.5)


def decode_attention(sizes: Sizes, device: torch.device, time_it, copy_bw: float, sweeps: list) -> list[dict]:
    rows = []
    scale = sizes.head_dim ** -0.5
    formats = {name: quantization_of(name, sizes.head_dim) for name in ("int4", "int2")}
    workspace = Workspace()
    sweep = [(c, b) for c in sizes.contexts for b in sizes.batches]
    for context, batch in tqdm(sweep, desc="decode attention"):
        generator = torch.Generator(device=device).manual_seed(context + batch)
        shape = (batch, sizes.kv_heads, context, sizes.head_dim)
        keys = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
        values = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
        query = torch.randn(batch, sizes.q_heads, 1, sizes.head_dim, generator=generator, device=device,
                            dtype=torch.bfloat16)
        empty = keys[:, :, :0]
        io = 2 * query.nbytes                                                # the query read, the output written
        def sdpa():
            return F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True)
        timings = {"SDPA, full bf16 cache": (time_it(sdpa), keys.nbytes + values.nbytes + io, None)}
        launch_costs = {"SDPA, full bf16 cache": sdpa}
        positions = torch.arange(context, device=device).expand(batch, sizes.kv_heads, context)
        everything = torch.ones(shape[:3], dtype=torch.bool, device=device)
        for name, quant in formats.items():
            quant = dataclasses.replace(quant, backend="triton")
            store = QuantizedStore.from_padded(keys, values, positions, everything, quant)

            def fused(store=store):
                return fused_decode_attention(query, store.decode_operands, empty, empty, scale)
            seconds = time_it(fused)
            best = getattr(_decode_kernel, "best_config", None)      # the autotuner's choice, if it ran
            timings[f"kvpipe fused {name}"] = (seconds, store.nbytes + io, f"tuned: {best}" if best else None)
            launch_costs[f"kvpipe fused {name}"] = fused
            if name == "int4":               # how the split count (default_splits) trades parallelism for merging
                chosen = default_splits(store.decode_operands.pages, store.decode_operands.heads, device)
                for factor in SPLIT_SWEEP if device.type == "cuda" else SPLIT_SWEEP[1:2]:
                    splits = max(1, round(chosen * factor))
                    sweeps.append({"context": context, "batch": batch, "splits": splits, "us": 1e6 * time_it(
                        lambda s=splits: fused_decode_attention(query, store.decode_operands, empty, empty, scale,
                                                                splits=s))})

                def torch_path(store=store):
                    k, v = store.attend(empty, empty, workspace)
                    return F.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True)
                timings["kvpipe torch path int4 (dequantize, SDPA)"] = (time_it(torch_path), store.nbytes + io, None)
        cache, why = hqq_quantized_cache(sizes, batch, keys, values)
        if cache is not None:
            def quantized_cache():
                k, v = cache.layers[0].update(empty[:, :, :1], empty[:, :, :1])
                return F.scaled_dot_product_attention(query, k, v, scale=scale, enable_gqa=True)
            timings["transformers QuantizedCache (HQQ int4)"] = (time_it(quantized_cache), None, None)
        else:
            timings["transformers QuantizedCache (HQQ int4)"] = (None, None, why)
        sdpa = timings["SDPA, full bf16 cache"][0]
        for contender, (seconds, read, note) in timings.items():
            loop = graph = None
            if contender in launch_costs:              # the cost of a call in a decode loop, and without launches
                fn = launch_costs[contender]
                loop, graph = back_to_back(device, fn, 100 if device.type == "cuda" else 1), graph_replay(device, fn)
            rows.append({"context": context, "batch": batch, "contender": contender,
                         "us": seconds * 1e6 if seconds else None, "MB": read / 1e6 if read else None,
                         "us back to back": loop * 1e6 if loop else None,
                         "us graph": graph * 1e6 if graph else None,
                         "gbps": read / seconds / 1e9 if seconds and read else None,
                         "pct_copy_bw": 100 * read / seconds / copy_bw if seconds and read else None,
                         "x_vs_sdpa": sdpa / seconds if seconds else None, "note": note})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
