"""Saved caches are untrusted input: every altered file is refused by a kvpipe error naming the field, in bounded
time and memory, and a cache never feeds a model other than the one that filled it."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvpipe
from kvpipe.core.shards import HeadShards
from kvpipe.errors import KVPipeError, UnsupportedModelError
from kvpipe.models import cache_arg
from kvpipe.runtime.cache_file import _own_file

from conftest import fresh_seed, tiny_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "bad_caches"))
from tamper import CASES  # noqa: E402


@pytest.fixture(scope="module")
def corpus_results(tmp_path_factory) -> tuple[dict[str, dict], dict]:
    """What ``tamper.py`` printed for each file of the corpus it wrote, and its peak memory."""
    folder = tmp_path_factory.mktemp("bad_caches")
    run = subprocess.run([sys.executable, str(HERE / "bad_caches" / "tamper.py"), str(folder)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    return {line["case"]: line for line in lines if "case" in line}, lines[-1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_altered_cache_is_refused_by_a_kvpipe_error_naming_the_field(corpus_results, case):
    results, _ = corpus_results
    outcome = results[case]
    assert outcome["error"] is not None, f"{case} loaded"
    assert "kvpipe.errors.KVPipeError" in outcome["error"], outcome
    assert re.search(CASES[case][2], outcome["message"]), outcome["message"]
    assert outcome["message"].split(": ")[0].endswith(f"/{case}.safetensors"), outcome["message"]   # file first
    assert outcome["seconds"] < 5, outcome


def test_the_corpus_loads_in_bounded_memory(corpus_results):
    """A file claiming 2**24 slots per head once allocated 2.9 GB: the checks come before any allocation."""
    _, memory = corpus_results
    assert memory["peak_after"] - memory["peak_before"] < 64 * 2 ** 20, memory


def saved(model, tmp_path, pipeline="streaming"):
    with kvpipe.build(pipeline).attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(torch.randint(2, 250, (1, 80), generator=torch.Generator().manual_seed(fresh_seed())),
              **cache_arg(model, cache))
        return kvpipe.save_cache(cache, tmp_path / "cache.safetensors")


@pytest.mark.parametrize("other, says", [
    (dict(seed=1), "model.fingerprint: saved from a model with the same configuration but other weights"),
    (dict(rope_parameters={"rope_theta": 500000.0, "rope_type": "default"}), "rope_parameters"),
    (dict(num_attention_heads=8), "num_attention_heads 4 .this model: 8."),
    (dict(vocab_size=300), "vocab_size 256 .this model: 300."),
])
def test_a_cache_from_another_model_of_the_same_kv_shape_is_refused(tmp_path, other, says):
    path = saved(tiny_model(), tmp_path)
    model = tiny_model(**other)
    with kvpipe.build("streaming").attach(model), pytest.raises(UnsupportedModelError, match=says):
        kvpipe.load_cache(path, model)


def test_the_same_model_loaded_again_reads_the_cache(tmp_path):
    """The identity is the configuration and the weights, not the object: a fresh load of the model passes."""
    path = saved(tiny_model(), tmp_path)
    model = tiny_model()
    with kvpipe.build("streaming").attach(model):
        assert kvpipe.load_cache(path, model).get_seq_length() == 80


def test_saving_where_nothing_can_be_written_is_a_kvpipe_error(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    model = tiny_model()
    with kvpipe.build("streaming").attach(model) as handle, torch.inference_mode():
        cache = handle.cache()
        model(torch.randint(2, 250, (1, 40)), **cache_arg(model, cache))
        with pytest.raises(KVPipeError, match="file/cache.safetensors: cannot write the cache there"):
            kvpipe.save_cache(cache, tmp_path / "file" / "cache.safetensors")
        handle.detach()
        with pytest.raises(UnsupportedModelError, match="save it before detach"):
            kvpipe.save_cache(cache, tmp_path / "cache.safetensors")


def index(tmp_path, shards) -> Path:
    path = tmp_path / "cache.safetensors"
    path.write_text(json.dumps({"format": "kvpipe-cache-index/2", "ranks": 2, "shards": shards}))
    return path


def test_an_index_names_each_rank_its_own_shard_and_nothing_else(tmp_path):
    ours = ["cache.rank0-of-2.safetensors", "cache.rank1-of-2.safetensors"]
    assert _own_file(index(tmp_path, ours), HeadShards(rank=1, world=2)).name == ours[1]
    for shards in (ours[::-1], ["../../x", ours[1]], [ours[0], "/etc/passwd"]):
        with pytest.raises(KVPipeError, match="cache.safetensors: shards: names"):
            _own_file(index(tmp_path, shards), HeadShards(rank=0, world=2))
