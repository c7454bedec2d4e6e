"""Past one device. Tensor parallelism (transformers' ``tp_plan``, two CPU processes over gloo): a pipeline
attached to each rank's shard of the model gives what one process gives: the same tokens, the same kept slots
(each rank holding its heads' share) and the same ``stats()`` on every rank. The pooled budgets are the point:
every layer's and every rank's heads compete for one budget, and the ranks must agree on it exactly.
Multi-device (accelerate's ``device_map`` with layers offloaded to the host and to disk): the same again."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvpipe.core.allocation import kth_largest, order_keys, pooled_counts

from conftest import tiny_gates_file, tiny_model
from tp_worker import run, scenarios

WORKER = Path(__file__).with_name("tp_worker.py")


@pytest.fixture(scope="module")
def tensor_parallel(tmp_path_factory):
    """``(one process's results, [rank 0's, rank 1's], folder)`` of ``tp_worker.run`` on one tiny Llama."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("tp")
    tiny_model().save_pretrained(folder / "model")
    gates = tiny_gates_file(folder)
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(WORKER), str(folder / "model"), gates, str(folder)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    with torch.no_grad():
        alone = run(AutoModelForCausalLM.from_pretrained(folder / "model").eval(), gates)
    return alone, ranks, folder


@pytest.mark.parametrize("name", list(scenarios("")))
def test_each_rank_compresses_its_heads_as_one_process_would(tensor_parallel, name):
    alone, ranks, _ = tensor_parallel
    expected = alone[name]
    union = sorted(slot for rank in ranks for slot in rank[name]["kept"])
    assert union == expected["kept"], "the ranks kept other slots than one process"
    for r, rank in enumerate(ranks):
        assert {head for _, head, _ in rank[name]["kept"]} == {r}, "a rank holds heads of another"
        assert rank[name]["tokens"] == expected["tokens"]
        stats = dict(rank[name]["stats"])
        sent = stats.pop("collective_bytes")
        assert stats == {k: v for k, v in expected["stats"].items() if k != "collective_bytes"}, \
            f"rank {r}'s stats() differ from one process's"
        # the per-head allocators need nothing of the other ranks: each rank sends only the two sizes of the first
        # compression's check that the stores are smaller than the tokens (16 bytes; compressor)
        assert (sent > 32) == (name.startswith("global") or name in ("adaptive_heads", "pyramid")), sent
        assert sent >= 32 or name == "noop"
    assert expected["stats"]["collective_bytes"] == 0


def test_the_benchmark_protocol_measures_the_whole_models_cache(tensor_parallel):
    alone, ranks, _ = tensor_parallel
    assert alone["full_cache_bytes"] == alone["noop"]["stats"]["kv_bytes_full"] > 0
    assert [rank["full_cache_bytes"] for rank in ranks] == [alone["full_cache_bytes"]] * 2


def test_each_rank_saves_its_heads_and_loads_them_back(tensor_parallel):
    from transformers import AutoModelForCausalLM

    import kvpipe
    from kvpipe.errors import KVPipeError

    from tp_worker import scenarios

    _, ranks, folder = tensor_parallel
    assert all(rank["saved_and_loaded"] for rank in ranks), "a reloaded shard answers otherwise"
    index = json.loads((folder / "cache.safetensors").read_text())
    assert index["ranks"] == 2 and all((folder / name).exists() for name in index["shards"])
    model = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
    with kvpipe.build(scenarios(tiny_gates_file(folder))["global-int4"]).attach(model):
        with pytest.raises(KVPipeError, match="saved by 2 tensor-parallel ranks"):
            kvpipe.load_cache(folder / "cache.safetensors", model)


def test_a_model_dispatched_over_devices_compresses_as_one_undispatched(tensor_parallel, tmp_path):
    """Layers on "cpu" and "disk" (accelerate moves each offloaded layer's weights in for its forward)."""
    from transformers import AutoModelForCausalLM

    alone, _, _ = tensor_parallel
    tiny_model().save_pretrained(tmp_path / "model")
    placement = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                 "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=placement,
                                                 offload_folder=tmp_path / "offload").eval()
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    with torch.no_grad():
        dispatched = run(model, tiny_gates_file(tmp_path))
    assert dispatched == alone


def test_pooled_budgets_talk_in_histograms_not_tokens(tensor_parallel):
    """A global budget's traffic is a few histograms per compression, whatever the context length."""
    _, ranks, _ = tensor_parallel
    sent = ranks[0]["global-zscore"]["stats"]["collective_bytes"]
    # 4 rounds of [B, 256] int32 counts per rank, tie counts, z-score sums
    assert 0 < sent < 4 * 2 * 256 * 4 + 4096


def test_kth_largest_is_a_sort():
    generator = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    values = torch.randn(3, 500, generator=generator).round(decimals=1)            # many ties
    values[0, :7] = float("inf")
    keys = order_keys(values)
    for k in (1, 2, 37, 499, 500):
        expected = values.sort(-1, descending=True).values[:, k - 1]
        found = kth_largest(keys, torch.full((3,), k))
        assert torch.equal(order_keys(expected), found)
    assert torch.equal(kth_largest(keys, torch.zeros(3, dtype=torch.long)), torch.full((3,), 2**32))


def test_pooled_counts_gives_tied_slots_to_the_first_units():
    scores = torch.tensor([[[3.0, 1.0, 1.0], [2.0, 1.0, 1.0], [1.0, 1.0, 0.5]]])
    valid = torch.ones_like(scores, dtype=torch.bool)
    counts = pooled_counts(scores, valid, None, torch.tensor([5]), torch.tensor([0]))
    # 3 and 2 win, then three slots among the five 1.0s: the first units' first
    assert counts.tolist() == [[3, 2, 0]]


def test_a_fault_on_one_rank_raises_on_every_rank_and_the_next_generate_works(tmp_path):
    """Without agreement, rank 0 waited forever in a collective rank 1 never joined (or gloo aborted on a mismatch)."""
    tiny_model().save_pretrained(tmp_path / "model")
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path),
                        "KVPIPE_COLLECTIVE_TIMEOUT": "60"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).with_name("tp_faults.py")), str(tmp_path / "model"), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    zero, one = (json.loads((tmp_path / f"faults{r}.json").read_text()) for r in range(2))
    for where in ("compress", "observe"):
        assert one[where] == {"raised": "KVPipeError", "message": f"injected fault on rank 1 ({where})"}
        assert zero[where]["raised"] == "PeerFailure", zero[where]
        assert zero[where]["message"].startswith("rank 1 of 2 failed while compressing the cache")
        assert zero[f"after {where}"] == one[f"after {where}"] and len(zero[f"after {where}"]) == 3
    assert one["load"]["raised"] == "FileError" and "faulty.rank1-of-2.safetensors" in one["load"]["message"]
    assert zero["load"]["raised"] == "PeerFailure" and "failed while loading the cache" in zero["load"]["message"]
    assert zero["after load"] == one["after load"] == zero["after compress"]
