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
   0.25, ``int4`` and ``value-aware-int4``, side by side in one process;
4. **capacity** — Llama-3.1-8B's shape cut to 4 layers, 32k tokens per sequence, chunked prefill, memory capped at
   24 GB: the largest batch each cache fits, decode tokens/s there and at a common batch, peak and held memory
   (the full cache, ``QuantizedCache`` when ``hqq`` is there, kvpipe ``int4``, ``value-aware-int4`` at bytes
   0.15, ``agnostic-int4``).

The parts live beside this driver: ``gpu_decode.py``, ``gpu_end_to_end.py``, ``gpu_capacity.py``, shapes in
``gpu_shapes.py``.
Also **launch** costs: the host's cost of one launch back to back (a torch kernel, Triton kernels of 1 and 24
arguments, kvpipe's fused decode call), which bounds decode at batch 1.

Writes ``gpu_check.json`` (and the same as ``<device>-<yyyy-mm-dd>.json``, to commit under ``docs/bench/gpu/``),
``gpu_check.md``, ``pytest.log``, ``profile.txt`` (torch profiler, a few decode
steps of the full cache and of ``int4``) and ``host_profile.txt`` (cProfile of 16 warm decode forwards per
end-to-end contender) into ``--out`` and prints the Markdown.
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
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from gpu_capacity import GPU as GPU_CAPACITY  # noqa: E402
from gpu_capacity import TINY as TINY_CAPACITY  # noqa: E402
from gpu_capacity import capacity, capacity_setup  # noqa: E402
from gpu_decode import decode_attention, fused_decode_call  # noqa: E402
from gpu_end_to_end import end_to_end, random_model  # noqa: E402
from gpu_launch import launch_costs  # noqa: E402
from gpu_shapes import GPU, TINY  # noqa: E402
from timing import copy_bandwidth, timer  # noqa: E402

from kvpipe.core.table import render  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["correctness", "launch", "decode", "end_to_end", "capacity"]


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
    if report.get("launch"):
        lines += ["## Host cost of a launch", "", table(report["launch"], ["launch", "us back to back"]), "",
                  "Calls issued back to back, kernels doing nearly nothing: the host's cost per launch. The fused "
                  f"decode call is one int4 step over {report['launch_context']:,} tokens, batch 1.", ""]
    if report.get("decode"):
        shape = report["decode_shape"]
        lines += [f"## Decode attention ({shape['q_heads']} query heads, {shape['kv_heads']} KV heads, head dim "
                  f"{shape['head_dim']}, bf16 queries)", "",
                  table(report["decode"], ["context", "batch", "contender", "us", "MB", "gbps", "pct_copy_bw",
                                           "x_vs_sdpa", "us back to back", "us graph", "note"]), "",
                  "`us`: `do_bench` median with L2 flushed between calls; `us back to back`: 100 calls issued "
                  "as a decode loop issues them (the larger of host launch cost and device time); `us graph`: "
                  "device time alone (20 calls in one CUDA graph, replayed).", ""]
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
    if report.get("capacity"):
        lines += [f"## Capacity: {report['capacity_setup']}", "",
                  table(report["capacity"], ["contender", "max_batch", "x batch", "tokens_per_s", "x tokens_per_s",
                                             "common_batch", "tokens_per_s_common", "peak_gb", "held_gb",
                                             "search_s"]), "",
                  "`max_batch`: the largest power of two whose chunked prefill, compression and decode ran under "
                  "the memory cap; `tokens_per_s`: decode tokens/s of all sequences together at that batch "
                  "(`_common`: at the largest batch every contender fits); `peak_gb`/`held_gb`: CUDA memory above "
                  "the weights, at most during the run and after it.", ""]
    for section, error in report.get("errors", {}).items():
        lines += [f"## {section}: FAILED", "", "```", error.strip()[-3000:], "```", ""]
    return "\n".join(lines)


def committed_name(report: dict) -> str:
    """``<device>-<yyyy-mm-dd>.json``, the name the report is committed under in ``docs/bench/gpu/``."""
    device = re.sub(r"[^a-z0-9]+", "-", (report["environment"].get("gpu") or "cpu-tiny").lower()).strip("-")
    return f"{device}-{time.strftime('%Y-%m-%d')}.json"


def write(report: dict, out: Path) -> str:
    data = json.dumps(report, indent=1, default=str)
    (out / "gpu_check.json").write_text(data)
    (out / committed_name(report)).write_text(data)          # commit this one as docs/bench/gpu/<its name>
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md, pytest.log")
    parser.add_argument("--tiny", action="store_true", help="CPU, Triton interpreter, toy shapes: checks the script")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=PARTS, help="run only these parts")
    parser.add_argument("-k", dest="select", help="passed to pytest -k (a subset of the correctness tests)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here; --tiny runs the script on the CPU with toy shapes")
    device = torch.device("cuda" if not args.tiny else "cpu")
    sizes = TINY if args.tiny else GPU
    capacity_sizes = TINY_CAPACITY if args.tiny else GPU_CAPACITY
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    time_it = timer(device)
    report: dict = {"environment": environment(device), "errors": {},
                    "decode_shape": {"q_heads": sizes.q_heads, "kv_heads": sizes.kv_heads, "head_dim": sizes.head_dim},
                    "e2e_shape": "Llama-3.2-1B shape" if not args.tiny else "toy Llama",
                    "e2e_tokens": sizes.e2e_context, "split_sweep": [], "launch_context": sizes.contexts[0],
                    "capacity_setup": capacity_setup(capacity_sizes)}
    copy_bw = copy_bandwidth(device, time_it, sizes.copy_numel)
    report["copy_GB_s"] = copy_bw / 1e9
    parts = {"correctness": lambda: correctness(args.out, args.select),
             "launch": lambda: launch_costs(device, fused_decode_call(sizes, device, sizes.contexts[0])),
             "decode": lambda: decode_attention(sizes, device, time_it, copy_bw, report["split_sweep"]),
             "end_to_end": lambda: end_to_end(sizes, device, args.out),
             "capacity": lambda: capacity(capacity_sizes, device, random_model)}
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
