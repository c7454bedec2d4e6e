"""``gpu_check.py``'s capacity part, the table users read first: how many sequences of a long context fit on this
GPU with each cache, and how fast they decode.

Setup: a random-weight model of Llama-3.1-8B's shape (32 query heads, 8 KV heads, head dim 128, 4096 wide) with its
layers cut to ``Capacity.layers`` (weights and cache both scale with the layers, so the ratios between contenders
hold; the whole model's own batch does not), a prompt of ``Capacity.context`` tokens per sequence, prefill in
chunks (a compressing contender compresses after every chunk, so no sequence is ever held whole), bf16. Usable
memory is capped at ``Capacity.memory_gb`` (``torch.cuda.set_per_process_memory_fraction``) so that the search fits
in a GPU session; the cap is reported with the numbers.

Contenders: the full bf16 cache (eager ``DynamicCache``; ``StaticCache`` + ``torch.compile`` is not measured yet),
transformers' ``QuantizedCache`` (HQQ, 4 bits) when ``hqq`` is installed, kvpipe ``int4``, ``value-aware-int4``
at bytes 0.15 and ``agnostic-int4``. Per contender: ``max_batch`` (the largest power of two whose prefill,
compression and decode run), decode ``tokens_per_s`` there and at the common batch (the largest every contender
fits), ``peak_gb`` (CUDA peak over prefill, compression and decode at ``max_batch``, weights excluded) and
``held_gb`` (what stays allocated after it, the cache). On the CPU (``--tiny``) nothing runs out of memory: the
cap applies to the cache's own peak bytes (kvpipe's ``kv_bytes_peak``), which checks the script, not a GPU.
"""
from __future__ import annotations

import gc
import importlib.util
import time
from dataclasses import dataclass

import torch
from gpu_end_to_end import Clock, chunked
from tqdm.auto import tqdm

import kvpipe


@dataclass(frozen=True)
class Capacity:
    config: dict
    context: int
    chunk: int
    new_tokens: int
    memory_gb: float
    largest: int            # the search stops here


GPU = Capacity(dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=True), 32768, 4096, 16, 24.0, 128)
TINY = Capacity(dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096),
                256, 64, 3, 1e-3, 16)


def contenders(sizes: Capacity) -> list[tuple[str, object, dict]]:
    """``(name, kvpipe pipeline or None, extra generate() arguments)``."""
    agnostic = kvpipe.build("agnostic-int4").spec.model_dump(mode="python", exclude_none=True)
    for stage in agnostic["stages"]:
        if isinstance(stage, dict) and stage.get("stage") == "reconstruction":
            stage["params"]["prompt"] = ""        # random weights have no tokenizer: the context is read again bare
    found = [("full bf16 cache", None, {}),
             ("kvpipe int4", chunked(kvpipe.build("int4"), sizes.chunk), {}),
             ("kvpipe value-aware-int4 @ bytes 0.15",
              chunked(kvpipe.build("value-aware-int4").with_budget(bytes=0.15), sizes.chunk), {}),
             ("kvpipe agnostic-int4", chunked(kvpipe.build(agnostic), sizes.chunk), {})]
    if importlib.util.find_spec("hqq") is not None:
        found.insert(1, ("transformers QuantizedCache (HQQ int4)", None,
                         {"cache_implementation": "quantized", "cache_config": {"backend": "hqq", "nbits": 4}}))
    return found


def decode_run(model, batch: int, sizes: Capacity, pipeline, extra: dict, device: torch.device) -> dict | None:
    """Prefill ``batch`` prompts in chunks, then decode: tokens/s and memory, or None when it does not fit."""
    ids = torch.randint(2, sizes.config["vocab_size"] - 1, (batch, sizes.context),
                        generator=torch.Generator().manual_seed(batch)).to(device)
    handle = pipeline.attach(model) if pipeline is not None else None
    clock = Clock(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=sizes.new_tokens,
                             min_new_tokens=sizes.new_tokens, do_sample=False, prefill_chunk_size=sizes.chunk,
                             logits_processor=[clock], return_dict_in_generate=True, **extra)
        row = {"tokens_per_s": batch * (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0])}
        if device.type == "cuda":
            row["peak_gb"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
            row["held_gb"] = (torch.cuda.memory_allocated(device) - base) / 1e9
        else:                   # the cache's own bytes, the only memory measured on the CPU
            cache = out.past_key_values
            if handle is not None:
                stats = handle.stats(cache)
                held, peak = stats["kv_bytes"], stats["kv_bytes_peak"]
            else:
                held = peak = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            row |= {"peak_gb": peak / 1e9, "held_gb": held / 1e9}
            if row["peak_gb"] > sizes.memory_gb:
                return None
        del out
        return row
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        if handle is not None:
            handle.detach()


def capacity(sizes: Capacity, device: torch.device, model_factory) -> list[dict]:
    """Per contender: the largest batch that fits (doubling from 1), its speed and memory, then every contender's
    speed at the common batch."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, sizes.memory_gb * 1e9 / total), device)
    model = model_factory(sizes.config, device)
    competing = contenders(sizes)
    rows = []
    try:
        for name, pipeline, extra in tqdm(competing, desc="capacity"):
            best, batch, started = None, 1, time.perf_counter()
            while batch <= sizes.largest:
                row = decode_run(model, batch, sizes, pipeline, extra, device)
                if row is None:
                    break
                best = {"contender": name, "max_batch": batch} | row
                batch *= 2
            rows.append(best or {"contender": name, "max_batch": 0, "note": "batch 1 does not fit"})
            rows[-1]["search_s"] = time.perf_counter() - started
        common = min(row["max_batch"] for row in rows)
        for (_, pipeline, extra), row in zip(competing, rows):
            at_common = decode_run(model, common, sizes, pipeline, extra, device) if common else None
            row |= {"common_batch": common, "tokens_per_s_common": at_common["tokens_per_s"] if at_common else None}
        full = rows[0]
        for row in rows:
            if row.get("max_batch") and full.get("max_batch"):
                row["x batch"] = row["max_batch"] / full["max_batch"]
                row["x tokens_per_s"] = row["tokens_per_s"] / full["tokens_per_s"]
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    return rows


def capacity_setup(sizes: Capacity) -> str:
    layers, width = sizes.config["num_hidden_layers"], sizes.config["hidden_size"]
    return (f"Llama-3.1-8B's attention shape, {width} wide, {layers} layers (cut from 32), random weights, "
            f"{sizes.context:,} tokens of prompt per sequence in chunks of {sizes.chunk:,}, {sizes.new_tokens} new "
            f"tokens, memory capped at {sizes.memory_gb:g} GB")
