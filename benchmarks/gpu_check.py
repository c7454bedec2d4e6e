"""The GPU check: one command that says whether kvpipe is correct and fast on this GPU, in about 5 minutes.

Random weights only (no model download is needed or possible): speed does not depend on the weights.

1. **correctness** — ``pytest -m gpu``: the Triton kernels compiled against their torch references in fp16 and
   bf16 (tolerances stated per dtype in the tests), every shipped pipeline through ``generate()`` on a
   random-weight Llama-shaped bf16 model, and the cache's reported bytes against what CUDA says it holds;
2. **decode attention** at Llama-3.1-8B's attention shape (32 query heads, 8 KV heads, head dim 128), contexts
   4k / 32k / 128k, batch 1 and 8: kvpipe's fused int4 and int2 kernels, SDPA over a full bf16 cache, kvpipe's
   torch path (dequantize, then SDPA: the algorithm of transformers' ``QuantizedCache``), and transformers'
   ``QuantizedCache`` itself when its HQQ backend is installed. Per contender: µs per step, bytes read,
   effective GB/s, % of the device-to-device copy bandwidth measured in the same run, speed-up over SDPA;
3. **end to end** — a random-weight model with Llama-3.2-1B's shape (16 layers) at a 32k-token prompt, batch 1:
   ``generate()`` decode tokens/s, prefill time and peak CUDA memory for the full cache, ``default`` at keep
   0.25, ``int4`` and ``value-aware-int4``, side by side in one process.

Writes ``gpu_check.json``, ``gpu_check.md``, ``pytest.log`` and ``profile.txt`` (torch profiler, a few decode
steps of the full cache and of ``int4``) into ``--out`` and prints the Markdown.
``--tiny`` runs the same script on the CPU (Triton's interpreter, toy shapes): the numbers mean nothing
there, it only proves the script still works (a test runs it).

Examples:
    python benchmarks/gpu_check.py --out gpu-results
    python benchmarks/gpu_check.py --out /tmp/check --tiny
"""
from __future__ import annotations

import os
import sys

if "--tiny" in sys.argv:         # Triton reads this when kernels are decorated: before any kvpipe kernel import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import kvpipe  # noqa: E402
from kvpipe.kernels.triton_decode import fused_decode_attention  # noqa: E402
from kvpipe.quantized_store import QuantizedStore, Workspace  # noqa: E402
from kvpipe.table import render  # noqa: E402
from timing import copy_bandwidth, timer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """Shapes of one run: the real ones on a GPU, toy ones for ``--tiny``."""

    q_heads: int
    kv_heads: int
    head_dim: int
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    copy_numel: int
    e2e_config: dict
    e2e_context: int
    e2e_new_tokens: int


GPU = Sizes(32, 8, 128, (4096, 32768, 131072), (1, 8), 2 ** 28,
            dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                 rope_theta=500000.0, tie_word_embeddings=True), 32768, 64)
TINY = Sizes(4, 2, 64, (256,), (1, 2), 2 ** 16,
             dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, max_position_embeddings=4096), 300, 4)


# --- 0. the machine ----------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import transformers
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"gpu": props.name, "multiprocessors": props.multi_processor_count,
                "memory_GiB": round(props.total_memory / 2 ** 30, 1), "cuda": torch.version.cuda}
    else:
        env |= {"gpu": None, "note": "--tiny: CPU, Triton interpreter; timings are meaningless"}
    return env


# --- 1. correctness ----------------------------------------------------------------------------------------------
def correctness(out: Path, select: str | None, timeout: float = 300) -> dict:
    """``pytest -m gpu`` in a subprocess; the log goes to ``pytest.log``, the counts into the report."""
    # compiling and autotuning the kernels is most of the time: spread the tests over processes when xdist is there
    parallel = ["-n", "8"] if importlib.util.find_spec("xdist") and torch.cuda.is_available() else []
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "-rfEs", *parallel,
               "tests/test_quant_kernels.py", "tests/test_gpu.py"] + (["-k", select] if select else [])
    started = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as late:
        (out / "pytest.log").write_text(f"timed out after {timeout} s\n{late.stdout or ''}{late.stderr or ''}")
        raise RuntimeError(f"pytest -m gpu did not finish in {timeout} s (see pytest.log)") from None
    (out / "pytest.log").write_text(done.stdout + done.stderr)
    summary = next((line for line in reversed(done.stdout.splitlines())
                    if re.search(r"\d+ (passed|failed|skipped|deselected|error)", line)), "no pytest summary")
    failed = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"command": " ".join(command[1:]), "returncode": done.returncode, "summary": summary.strip("= "),
            "failed": failed, "seconds": round(time.perf_counter() - started, 1)}


# --- 2. decode attention -------------------------------------------------------------------------------------------
def quantization_of(name: str, head_dim: int):
    """The storage a shipped pipeline asks for (so the benchmark measures exactly what ``int4`` ships)."""
    return kvpipe.build(name).quantizer.quantization(head_dim)


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


SPLIT_SWEEP = (16, 32, 64, 128)


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
        timings = {"SDPA, full bf16 cache": (time_it(lambda: F.scaled_dot_product_attention(
            query, keys, values, scale=scale, enable_gqa=True)), keys.nbytes + values.nbytes + io, None)}
        positions = torch.arange(context, device=device).expand(batch, sizes.kv_heads, context)
        everything = torch.ones(shape[:3], dtype=torch.bool, device=device)
        for name, quant in formats.items():
            quant = dataclasses.replace(quant, backend="triton")
            store = QuantizedStore.from_padded(keys, values, positions, everything, quant)
            res = store.residual

            def fused(store=store, res=res, fmt=quant.fmt):
                return fused_decode_attention(query, store.pages, store.page_counts, fmt, res.keys, res.values,
                                              res.lengths, empty, empty, scale, page_starts=store.page_starts,
                                              residual_starts=res.starts)
            timings[f"kvpipe fused {name}"] = (time_it(fused), store.nbytes + io, None)
            if name == "int4":               # how the split count (default_splits) trades parallelism for merging
                for splits in SPLIT_SWEEP if device.type == "cuda" else SPLIT_SWEEP[:1]:
                    sweeps.append({"context": context, "batch": batch, "splits": splits, "us": 1e6 * time_it(
                        lambda s=splits: fused_decode_attention(
                            query, store.pages, store.page_counts, quant.fmt, res.keys, res.values, res.lengths,
                            empty, empty, scale, splits=s, page_starts=store.page_starts, residual_starts=res.starts))})

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
            rows.append({"context": context, "batch": batch, "contender": contender,
                         "us": seconds * 1e6 if seconds else None, "MB": read / 1e6 if read else None,
                         "GB/s": read / seconds / 1e9 if seconds and read else None,
                         "% copy BW": 100 * read / seconds / copy_bw if seconds and read else None,
                         "x vs SDPA": sdpa / seconds if seconds else None, "note": note})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --- 3. end to end -------------------------------------------------------------------------------------------------
class Clock:
    """A logits processor that stamps the time of every generated token (after a device sync)."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def random_model(sizes: Sizes, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes.e2e_config, attn_implementation="sdpa", pad_token_id=0, eos_token_id=None,
                         bos_token_id=1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    return model


def forward_steps(model, cache, token: torch.Tensor, steps: int, device: torch.device) -> float:
    """Decode tokens/s of bare forward calls on ``cache`` (no ``generate()`` bookkeeping): the model's own cost."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - started)


def profile_decode(model, ids, device: torch.device, pipeline=None, steps: int = 8) -> str:
    """The top operators of a few ``generate()`` decode steps after a short prompt, by self time (CPU and CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    handle = pipeline.attach(model) if pipeline is not None else None
    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False)
    finally:
        if handle is not None:
            handle.detach()
    averages = prof.key_averages()
    text = averages.table(sort_by="self_cpu_time_total", row_limit=15)
    if device.type == "cuda":
        text += "\n" + averages.table(sort_by="self_cuda_time_total", row_limit=12)
    return text


def generate_once(model, ids, new_tokens: int, device: torch.device, pipeline=None, **generate_kwargs) -> dict:
    handle = pipeline.attach(model) if pipeline is not None else None
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    try:
        started = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             logits_processor=[clock], return_dict_in_generate=True, **generate_kwargs)
        row = {"prefill_s": clock.stamps[0] - started,
               "decode_tok_s": (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0])}
        if device.type == "cuda":
            row["peak_GB"] = (torch.cuda.max_memory_allocated(device) - base) / 1e9
            row["held_after_GB"] = (torch.cuda.memory_allocated(device) - base) / 1e9
        if handle is not None:
            stats = handle.stats(out.past_key_values)
            row |= {"kv_GB": stats["kv_bytes"] / 1e9, "kv_peak_GB": stats["kv_bytes_peak"] / 1e9,
                    "compress_s": stats["compress_seconds"]}
        else:
            row["kv_GB"] = sum(layer.keys.nbytes + layer.values.nbytes for layer in out.past_key_values.layers) / 1e9
            row["kv_peak_GB"] = row["kv_GB"]
        row["forward_tok_s"] = forward_steps(model, out.past_key_values, out.sequences[:, -1:], 16, device)
        del out
        return row
    finally:
        if handle is not None:
            handle.detach()


def end_to_end(sizes: Sizes, device: torch.device, out: Path) -> list[dict]:
    model = random_model(sizes, device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, sizes.e2e_config["vocab_size"] - 1, (1, sizes.e2e_context), generator=generator).to(device)
    # Chunked prefill: generate() feeds the prompt in chunks and the pipeline compresses after each, so the whole
    # prompt is never held uncompressed: the peak falls with the bytes, not only what is held afterwards.
    chunk = max(64, sizes.e2e_context // 8)
    chunked = kvpipe.build(kvpipe.build("int4").spec.model_dump(mode="python", exclude_none=True)
                           | {"trigger": {"prefill": True, "every": chunk}})
    contenders = [("full cache", None, {}), ("default @ keep 0.25", kvpipe.build("default").with_budget(keep=0.25), {}),
                  ("int4", kvpipe.build("int4"), {}), ("value-aware-int4", kvpipe.build("value-aware-int4"), {}),
                  (f"int4, prefill in chunks of {chunk}", chunked, {"prefill_chunk_size": chunk})]
    rows = []
    for name, pipeline, generate_kwargs in tqdm(contenders, desc="end to end"):
        # Twice, the same call: the first (cold) pays what is built once per shape — Triton compiles and tunes,
        # and torch's cuDNN attention builds an execution plan for every new key length (~4 ms a call on an H200
        # with torch 2.11, which a decode step always is). The second (warm) run is the steady state.
        cold = generate_once(model, ids, sizes.e2e_new_tokens, device, pipeline, **generate_kwargs)
        warm = generate_once(model, ids, sizes.e2e_new_tokens, device, pipeline, **generate_kwargs)
        rows.append({"contender": name} | warm | {"cold_decode_tok_s": cold["decode_tok_s"]})
    profiles = "\n".join(f"### {name}\n{profile_decode(model, ids[:, :4096], device, pipeline)}"
                         for name, pipeline, _ in contenders[:3:2])
    (out / "profile.txt").write_text(profiles)
    full = rows[0]
    for row in rows:
        row["x decode speed"] = row["decode_tok_s"] / full["decode_tok_s"]
        if "peak_GB" in row:
            row["x peak memory"] = row["peak_GB"] / full["peak_GB"]
        row["x KV bytes"] = row["kv_GB"] / full["kv_GB"]
        row["x KV peak"] = row["kv_peak_GB"] / full["kv_peak_GB"]
    return rows


# --- report ------------------------------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[str]) -> str:
    return render(columns, [[("—" if row.get(c) is None else row.get(c)) for c in columns] for row in rows])


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# kvpipe GPU check", "",
             f"{env.get('gpu') or 'CPU (--tiny)'}; torch {env['torch']}, triton {env['triton']}, "
             f"transformers {env['transformers']}; copy bandwidth {report.get('copy_GB_s', 0):.0f} GB/s "
             f"(read + write, measured in this run); {report['seconds']:.0f} s in all.", ""]
    tests = report.get("correctness")
    if tests:
        lines += ["## Correctness (`pytest -m gpu`)", "", f"`{tests['command']}`: **{tests['summary']}** "
                  f"({tests['seconds']} s).", ""] + [f"- FAILED {f}" for f in tests["failed"]] + [""]
    if report.get("decode"):
        shape = report["decode_shape"]
        lines += [f"## Decode attention ({shape['q_heads']} query heads, {shape['kv_heads']} KV heads, head dim "
                  f"{shape['head_dim']}, bf16 queries)", "",
                  table(report["decode"], ["context", "batch", "contender", "us", "MB", "GB/s", "% copy BW",
                                           "x vs SDPA", "note"]), ""]
    if report.get("split_sweep"):
        lines += ["### Fused int4: µs per step by page splits per head", "",
                  table(report["split_sweep"], ["context", "batch", "splits", "us"]), ""]
    if report.get("end_to_end"):
        lines += [f"## End to end: {report['e2e_shape']}, random weights, batch 1, "
                  f"{report['e2e_tokens']} tokens of prompt", "",
                  table(report["end_to_end"], ["contender", "prefill_s", "compress_s", "cold_decode_tok_s",
                                               "decode_tok_s", "x decode speed", "forward_tok_s", "kv_GB",
                                               "x KV bytes", "x KV peak", "peak_GB", "x peak memory",
                                               "held_after_GB"]), "",
                  "`decode_tok_s`: `generate()`, 64 new tokens, the second of two identical calls "
                  "(`cold_decode_tok_s`: the first); `forward_tok_s`: 16 bare forward calls on the same "
                  "cache afterwards; `x KV peak`: the most the cache held at any point, over the full cache's; "
                  "`peak_GB`: most CUDA memory above the weights during `generate()` (prefill included: "
                  "compression runs after each prefill forward, so only chunked prefill lowers it); "
                  "`held_after_GB`: what stays allocated with the cache alive.", ""]
    for section, error in report.get("errors", {}).items():
        lines += [f"## {section}: FAILED", "", "```", error.strip()[-3000:], "```", ""]
    return "\n".join(lines)


def write(report: dict, out: Path) -> str:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, pytest.log")
    parser.add_argument("--tiny", action="store_true", help="CPU, Triton interpreter, toy shapes: checks the script")
    parser.add_argument("--only", nargs="+", choices=["correctness", "decode", "end_to_end"],
                        default=["correctness", "decode", "end_to_end"], help="run only these parts")
    parser.add_argument("-k", dest="select", help="passed to pytest -k (a subset of the correctness tests)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here; --tiny runs the script on the CPU with toy shapes")
    device = torch.device("cuda" if not args.tiny else "cpu")
    sizes = TINY if args.tiny else GPU
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    time_it = timer(device)
    report: dict = {"environment": environment(device), "errors": {},
                    "decode_shape": {"q_heads": sizes.q_heads, "kv_heads": sizes.kv_heads, "head_dim": sizes.head_dim},
                    "e2e_shape": "Llama-3.2-1B shape" if not args.tiny else "toy Llama",
                    "e2e_tokens": sizes.e2e_context, "split_sweep": []}
    copy_bw = copy_bandwidth(device, time_it, sizes.copy_numel)
    report["copy_GB_s"] = copy_bw / 1e9
    parts = {"correctness": lambda: correctness(args.out, args.select),
             "decode": lambda: decode_attention(sizes, device, time_it, copy_bw, report["split_sweep"]),
             "end_to_end": lambda: end_to_end(sizes, device, args.out)}
    for name in args.only:
        try:                      # one part failing must not lose the others' numbers
            report[name] = parts[name]()
        except Exception:
            report["errors"][name] = traceback.format_exc()
            print(report["errors"][name], file=sys.stderr)
        report["seconds"] = time.perf_counter() - started
        text = write(report, args.out)             # after every part: a run stopped by a time limit keeps the rest
    print(text)
    failed_tests = report.get("correctness", {}).get("returncode", 0) not in (0, 5)
    return 1 if report["errors"] or failed_tests else 0


if __name__ == "__main__":
    sys.exit(main())
