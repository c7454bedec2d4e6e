"""``benchmarks/gpu_check.py --tiny``: the GPU check runs end to end on the CPU (Triton's interpreter, toy shapes),
so the script cannot rot between the sessions that have a GPU."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_tiny_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--out", str(tmp_path),
                           "-k", "compaction"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"] == {}
    assert report["correctness"]["returncode"] == 0 and "passed" in report["correctness"]["summary"]
    timed = {row["contender"] for row in report["decode"] if row["us"] is not None}
    assert {"SDPA, full bf16 cache", "kvpipe fused int4", "kvpipe fused int2",
            "kvpipe torch path int4 (dequantize, SDPA)"} <= timed
    assert all(math.isfinite(row["us"]) and row["us"] > 0 for row in report["decode"] if row["us"] is not None)
    end_to_end = {row["contender"]: row for row in report["end_to_end"]}
    chunked = "int4, prefill in chunks of 64"
    assert set(end_to_end) == {"full cache", "default @ keep 0.25", "int4", "value-aware-int4", chunked,
                               "default @ keep 0.25, prefill in chunks of 64"}
    assert all(row["decode_tok_s"] > 0 for row in end_to_end.values())
    assert end_to_end["int4"]["kv_GB"] < end_to_end["full cache"]["kv_GB"]
    # compressing after the prefill forward leaves the peak where the full cache's is; chunked prefill lowers it
    assert end_to_end["int4"]["x KV peak"] > 0.9 and end_to_end[chunked]["x KV peak"] < 0.5
    text = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## Correctness", "## Host cost of a launch", "## Decode attention", "## End to end"):
        assert heading in text
    assert (tmp_path / "profile.txt").stat().st_size > 0
    host = (tmp_path / "host_profile.txt").read_text()
    assert host.count("### ") == 6 and "kvpipe/runtime" in host         # every contender; kvpipe's own calls seen
    launches = {row["launch"]: row["us back to back"] for row in report["launch"]}
    assert len(launches) == 4 and all(us > 0 for us in launches.values())


def test_decode_kernel_compiles_for_hopper_without_a_gpu():
    """``benchmarks/compile_sm90.py``: the kernel compiled for sm_90 on this machine, at most a few spilled words at
    the first configuration, and a page loop found in the machine code (what the script reports between GPU
    sessions)."""
    done = subprocess.run([sys.executable, "benchmarks/compile_sm90.py", "--configs", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("BLOCK_N"))
    registers, stack, per_token = (float(re.search(pattern, line).group(1)) for pattern in
                                   (r"registers\s+(\d+)", r"stack\s+(\d+)", r"loop\s+([\d.]+)"))
    assert 0 < registers <= 255 and per_token > 0
    assert stack <= 16, line                    # a spill of a few words at most (maxnreg caps the first config)
