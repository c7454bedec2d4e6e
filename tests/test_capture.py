"""Observe once, compress many: every shipped pipeline compressing a fork of one recorded prefill gives exactly
what attaching it and prefilling gives (kept positions, bytes, likelihood score, answer), on the real model.
And the bench's two shortcuts (shared prefill, generation skipped where the score proves it) change no record."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

import kvpipe
from kvpipe.eval.bench import run_suite
from kvpipe.eval.protocol import Protocol
from kvpipe.eval.suite import load_suite
from kvpipe.eval.tasks import make_cases
from kvpipe.runtime.capture import capture, compressed

SHIPPED = sorted(path.stem for path in (Path(__file__).parents[1] / "pipelines").glob("*.yaml"))
TIMING = {"prefill_s", "decode_tps", "compress_s", "generated", "shared"}


@pytest.fixture(scope="module")
def case_and_reference(smollm):
    """A vartrack case at 400 tokens (it has a multi-step answer) and the full cache's answer to it."""
    model, tokenizer = smollm
    protocol = Protocol(model, tokenizer)
    case = make_cases(tokenizer, 400, 1, seed=5, kind="vartrack")[0]
    reference = protocol.reference_answer(case, DynamicCache(config=model.config))
    return protocol, case, reference, capture(model, protocol.compressed_part(case))


def kept_positions(cache) -> list[torch.Tensor]:
    """Per layer, the logical positions each (row, head) holds, in slot order, padding dropped."""
    views = [layer.view(None) for layer in cache.layers]
    return [view.positions[view.valid] for view in views]


@pytest.mark.real_model
@pytest.mark.parametrize("name", SHIPPED)
def test_compressing_a_shared_prefill_equals_attaching_the_pipeline(case_and_reference, name):
    protocol, case, reference, captured = case_and_reference
    pipeline = kvpipe.build(name)
    seen = {}
    alone = protocol.ask_pipeline(pipeline, case, reference.tokens,
                                  after_prefill=lambda c: seen.setdefault("alone", kept_positions(c)))
    shared = protocol.ask_pipeline(pipeline, case, reference.tokens, captured=captured,
                                   after_prefill=lambda c: seen.setdefault("shared", kept_positions(c)))
    assert all(torch.equal(a, b) for a, b in zip(seen["alone"], seen["shared"]))
    assert shared.kv_bytes == alone.kv_bytes and shared.score == alone.score
    assert torch.equal(shared.tokens, alone.tokens) and shared.text == alone.text
    if pipeline.evicts:
        assert shared.kv_bytes < 0.9 * reference.kv_bytes                       # it did compress


@pytest.mark.real_model
def test_a_capture_is_left_untouched_by_the_pipelines_that_compress_it(case_and_reference):
    _, _, _, captured = case_and_reference
    before = [layer.keys.clone() for layer in captured.cache.layers]
    compressed(kvpipe.build("int4-then-evict"), captured)
    assert all(layer.store is None and torch.equal(layer.keys, b) for layer, b in zip(captured.cache.layers, before))


@pytest.mark.real_model
def test_probing_pipelines_share_one_probe_per_capture_and_need_their_attach(case_and_reference):
    """agnostic and agnostic-int4 (the same reconstruction stage) at two budgets: one probe runs, and each cache
    is charged its seconds; compressing without the pipeline's own attach is refused."""
    protocol, _, _, captured = case_and_reference
    with pytest.raises(ValueError, match="pass the handle of this pipeline's attach"):
        compressed(kvpipe.build("agnostic"), captured)
    charged = []
    for pipeline in (kvpipe.build("agnostic").with_budget(keep=0.5), kvpipe.build("agnostic"),
                     kvpipe.build("agnostic-int4")):
        with pipeline.attach(protocol.model, protocol.tokenizer) as handle:
            cache = compressed(pipeline, captured, handle)
            charged.append(cache.probe_seconds)
            assert handle.stats(cache)["probe_vs_forward"] > 0
    assert [key[0] for key in captured.probes] == ["reconstruction"]         # one probe served all three
    assert charged[0] > 0 and charged.count(charged[0]) == 3


SUITE = """\
version: 1
name: shortcuts
contexts: [400]
cases: 2
tasks: [single, vartrack]
budgets: [{keep: 0.5}]
pipelines:
  - default
  - {pipeline: int4, budgets: own}
peers: [hqq-int4]
"""


@pytest.mark.real_model
def test_the_bench_shortcuts_change_no_record(tmp_path, smollm):
    model, tokenizer = smollm
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE)
    suite, _ = load_suite(path)
    fast = run_suite(suite, tmp_path, model, tokenizer, tmp_path / "fast", progress=False)
    slow = run_suite(suite, tmp_path, model, tokenizer, tmp_path / "slow", progress=False, share=False,
                     always_generate=True)
    fast, slow = ([{k: v for k, v in r.items() if k not in TIMING} for r in records if r["kind"] == "task"]
                  for records in (fast, slow))
    assert len(fast) == 2 * 2 * 4 and fast == slow
    skipped = [r for r in run_records(tmp_path / "fast") if r.get("generated") is False]
    assert skipped, "no answer was proven by its score: the shortcut was never exercised"


def run_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
