"""`kvpipe bench`: suite validation, the runner's files, and the harness's own sanity check."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvpipe.cli import main
from kvpipe.errors import KVPipeError, SpecError
from kvpipe.eval.bench import run_suite
from kvpipe.eval.contenders import kvpress_available, peer
from kvpipe.eval.report import PLOTS, write_report
from kvpipe.eval.suite import load_suite

from conftest import tiny_model

SUITE = """\
version: 1
name: tiny
contexts: [256]
cases: 2
tasks: [single, common_words]
budgets: [{keep: 0.5}]
pipelines:
  - default
  - {pipeline: noop, budgets: own, label: keep everything}
fidelity: {context: 96, continuation: 16}
"""


def write(tmp_path, text: str, name: str = "suite.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def tiny_with_real_tokenizer(smollm):
    """A 2-layer random model over SmolLM2's vocabulary, so generated tasks (real tokenizer) can run fast."""
    _, tokenizer = smollm
    return tiny_model("llama", "sdpa", vocab_size=len(tokenizer)), tokenizer


@pytest.mark.real_model
def test_runner_writes_records_report_and_plots(tmp_path, tiny_with_real_tokenizer):
    model, tokenizer = tiny_with_real_tokenizer
    suite, _ = load_suite(write(tmp_path, SUITE))
    out = tmp_path / "out"
    records = run_suite(suite, tmp_path, model, tokenizer, out, progress=False)
    written = write_report(records, out)
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert lines == json.loads(json.dumps(records))
    answers = [r for r in lines if r["kind"] == "task"]
    assert len(answers) == 2 * 2 * 3                       # tasks × cases × (full, default@0.5, keep everything)
    assert {r["contender"] for r in answers} == {"full cache", "default @ keep=0.5", "keep everything @ own"}
    assert len([r for r in lines if r["kind"] == "fidelity"]) == 2
    report = (out / "report.md").read_text()
    assert "## 256 tokens, question-agnostic" in report and "| default @ keep=0.5" in report
    assert "transformers" in report and "seed 0" in report          # versions and seed recorded
    assert lines[-1]["kind"] == "finished" and lines[-1]["seconds"] > 0 and "; ran in " in report
    for name in PLOTS:
        assert (out / name) in written and (out / name).read_bytes()[:4] == b"\x89PNG"
    evicted = [r for r in answers if r["contender"] == "default @ keep=0.5"]
    assert all(0.3 < r["bytes_fraction"] < 0.7 for r in evicted)


@pytest.mark.real_model
def test_a_pipeline_that_keeps_everything_scores_exactly_the_full_cache(tmp_path, tiny_with_real_tokenizer):
    model, tokenizer = tiny_with_real_tokenizer
    suite, _ = load_suite(write(tmp_path, SUITE))
    records = run_suite(suite, tmp_path, model, tokenizer, tmp_path / "out", progress=False)
    full = {(r["task"], r["case"]): r for r in records if r.get("family") == "full"}
    kept = [r for r in records if r.get("contender") == "keep everything @ own" and r["kind"] == "task"]
    assert kept and all(r["answer"] == full[r["task"], r["case"]]["answer"] for r in kept)
    assert all(r["correct"] == full[r["task"], r["case"]]["correct"] and r["bytes_fraction"] == 1 for r in kept)
    fidelity = next(r for r in records if r.get("contender") == "keep everything @ own" and r["kind"] == "fidelity")
    assert fidelity["kl"] == 0 and fidelity["ppl"] == fidelity["ppl_full"]


@pytest.mark.real_model
def test_quantized_cache_peer_runs_beside_pipelines(tmp_path, smollm):
    model, tokenizer = smollm
    suite, _ = load_suite(write(tmp_path, SUITE.replace("cases: 2", "cases: 1").replace("common_words", "multikey")
                                + "peers: [hqq-int4]\n"))
    records = run_suite(suite, tmp_path, model, tokenizer, tmp_path / "out", progress=False)
    hqq = [r for r in records if r.get("family") == "transformers"]
    assert {r["contender"] for r in hqq} == {"transformers hqq-int4 @ own"} and len(hqq) == 3  # 2 tasks + fidelity
    held = [r["bytes_fraction"] for r in hqq if r["kind"] == "task"]
    assert all(0.125 < b < 0.25 for b in held), held   # 4-bit codes over fp32 = 1/8, plus scales and zeros
    assert next(r for r in hqq if r["kind"] == "fidelity")["kl"] > 0


@pytest.mark.parametrize("text, where, message", [
    (SUITE.replace("tasks:", "taskz:"), ":5:1: taskz", "unknown key 'taskz'; did you mean 'tasks'?"),
    (SUITE.replace("common_words", "common_word"), ":5:8: tasks", "did you mean 'common_words'?"),
    (SUITE + "peers: [kvpress-snapkvv]\n", ":11:8: peers", "unknown peer 'kvpress-snapkvv'"),
    (SUITE.replace("contexts: [256]", "contexts: [100]"), ":3:11: contexts", "at least 256 tokens"),
    (SUITE.replace("budgets: [{keep: 0.5}]\n", ""), ":7:5: pipelines[0]", "`budgets:` is empty"),
    (SUITE.replace("{keep: 0.5}", "{keep: 2}"), ":6:18: budgets[0].keep", "less than or equal to 1"),
    (SUITE.replace("budgets: own", "budgets: mine"), ":9:31: pipelines[1].budgets", "or `own`"),
    (SUITE.replace("version: 1", "version: [1"), ":", "YAML syntax error"),
])
def test_malformed_suites_name_file_line_and_key(tmp_path, text, where, message):
    path = write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_suite(path)
    assert str(err.value).startswith(str(path)) and where in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "benchmarks" / "suites").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_suite_loads(path):
    suite, _ = load_suite(path)
    assert suite.pipelines and suite.contexts


def test_cli_rejects_a_bad_suite_before_loading_the_model(tmp_path, capsys):
    path = write(tmp_path, SUITE.replace("- default", "- no-such-pipeline"))
    assert main(["bench", str(path)]) == 1
    assert "no such pipeline file" in capsys.readouterr().err
    assert main(["bench", str(write(tmp_path, SUITE, "good.yaml")), "--contexts", "100"]) == 1
    assert "error: command line: --contexts: contexts must be at least 256 tokens" in capsys.readouterr().err


@pytest.mark.real_model
@pytest.mark.skipif(kvpress_available(), reason="kvpress is installed here")
def test_suite_lists_kvpress_peers_it_could_not_run(tmp_path, tiny_with_real_tokenizer):
    model, tokenizer = tiny_with_real_tokenizer
    suite, _ = load_suite(write(tmp_path, SUITE.replace("cases: 2", "cases: 1").replace(", common_words", "")
                                + "peers: [kvpress-snapkv]\n"))
    with pytest.warns(UserWarning, match="kvpress-snapkv not run: kvpress is not installed"):
        records = run_suite(suite, tmp_path, model, tokenizer, tmp_path / "out", progress=False)
    write_report(records, tmp_path / "out", plots=False)
    assert "- kvpress-snapkv: not run, kvpress is not installed" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.skipif(kvpress_available(), reason="kvpress is installed here")
def test_kvpress_peer_without_kvpress_says_how_to_get_it():
    from kvpipe.core.spec import Budget

    with pytest.raises(KVPipeError, match="make test-tf52"):
        peer("kvpress-snapkv", Budget(keep=0.5))


QUESTIONS = SUITE.replace("tasks: [single, common_words]", "tasks: [single]\nquestions_per_context: 3").replace(
    "fidelity: {context: 96, continuation: 16}\n", "")


@pytest.mark.real_model
def test_several_questions_on_one_compressed_context_answer_as_each_asked_alone(tmp_path, tiny_with_real_tokenizer):
    """The multi-question protocol compresses a context once and asks each question on a fork: every answer
    must be the one that question gets when its prompt is run alone (no question sees another)."""
    from kvpipe.eval.protocol import Protocol
    from kvpipe.eval.tasks import make_question_sets
    from kvpipe.runtime.pipeline import build

    model, tokenizer = tiny_with_real_tokenizer
    suite, _ = load_suite(write(tmp_path, QUESTIONS))
    written = run_suite(suite, tmp_path, model, tokenizer, tmp_path / "out", progress=False)
    write_report(written, tmp_path / "out", plots=False)
    records = [r for r in written if r["kind"] == "task"]
    assert len(records) == 2 * 3 * 3                       # contexts × questions × (full, default@0.5, noop)
    assert sorted({(r["case"], r["question"]) for r in records}) == [(c, q) for c in range(2) for q in range(3)]
    protocol = Protocol(model, tokenizer)
    pipeline = build("default").with_budget(keep=0.5)
    for c, cases in enumerate(make_question_sets(tokenizer, 256, 2, 3)):
        for q, case in enumerate(cases):
            alone = protocol.ask_pipeline(pipeline, case)
            asked = next(r for r in records
                         if (r["case"], r["question"], r["contender"]) == (c, q, "default @ keep=0.5"))
            assert asked["answer"] == alone.text and asked["kv_bytes"] == alone.kv_bytes
    full = {(r["case"], r["question"]): r["answer"] for r in records if r["family"] == "full"}
    kept = [r for r in records if r["contender"] == "keep everything @ own"]
    assert all(r["answer"] == full[r["case"], r["question"]] for r in kept)
    assert "2 contexts × 3 questions" in (tmp_path / "out" / "report.md").read_text()


def test_several_questions_need_the_single_task_and_the_agnostic_protocol(tmp_path):
    bad = write(tmp_path, QUESTIONS.replace("tasks: [single]", "tasks: [single, multikey]"))
    with pytest.raises(SpecError, match=r"suite.yaml:6:24: questions_per_context.*tasks: \[single\]"):
        load_suite(bad)


@pytest.mark.real_model
@pytest.mark.skipif(not kvpress_available(), reason="kvpress not installed (it needs transformers<5.3): make test-tf52")
def test_kvpress_peers_run_through_kvpress_pipeline(tmp_path, smollm):
    model, tokenizer = smollm
    suite, _ = load_suite(write(tmp_path, SUITE.replace("cases: 2", "cases: 1").replace(", common_words", "")
                                + "peers: [kvpress-snapkv, kvpress-adakv-snapkv, kvpress-kvzip]\n"))
    records = run_suite(suite, tmp_path, model, tokenizer, tmp_path / "out", progress=False)
    answers = {r["contender"]: r for r in records if r["kind"] == "task"}
    snapkv, adakv = answers["kvpress-snapkv @ keep=0.5"], answers["kvpress-adakv-snapkv @ keep=0.5"]
    assert snapkv["answer"] and 0.45 < snapkv["bytes_fraction"] < 0.55    # evicts for real
    assert adakv["bytes_fraction"] > 0.95                                  # masks: nothing is freed
    kvzip = answers["kvpress-kvzip @ keep=0.5"]          # it reloads the tokenizer by the model's name: found
    assert kvzip["answer"] and kvzip["bytes_fraction"] > 0.95          # global ranking: masks, frees nothing
    fidelity = {r["contender"]: r for r in records if r["kind"] == "fidelity"}
    assert fidelity["kvpress-snapkv @ keep=0.5"]["kl"] > 0


def test_pipelines_that_evict_nothing_run_once_without_a_budget_label(tmp_path):
    from kvpipe.eval.bench import contenders

    suite, _ = load_suite(write(tmp_path, SUITE.replace("  - {pipeline: noop, budgets: own, label: keep everything}",
                                                         "  - noop\n  - int4")))
    labels = [c.label for c in contenders(suite, tmp_path)[0]]
    assert labels == ["default @ keep=0.5", "noop @ own", "int4 @ own"]


@pytest.mark.real_model
def test_a_fidelity_context_longer_than_the_prose_is_refused_before_any_task(tmp_path, smollm):
    from kvpipe.eval.bench import check_fidelity

    _, tokenizer = smollm
    check_fidelity(load_suite(write(tmp_path, SUITE))[0], tokenizer)
    long = SUITE.replace("fidelity: {context: 96, continuation: 16}", "fidelity: {context: 900000, continuation: 16}")
    with pytest.raises(KVPipeError, match="fidelity needs 900,016 tokens of held-out prose"):
        check_fidelity(load_suite(write(tmp_path, long, "long.yaml"))[0], tokenizer)


def test_suite_files_with_a_python_tag_or_not_utf8_are_one_located_line(tmp_path):
    bad = write(tmp_path, SUITE.replace("cases: 2", "cases: !!python/object/apply:os.system [true]"))
    with pytest.raises(SpecError, match=r"suite.yaml:4:8: unsupported YAML tag"):
        load_suite(bad)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(SUITE.replace("name: tiny", "name: caf\xe9").encode("latin-1"))
    with pytest.raises(SpecError, match="not UTF-8 text"):
        load_suite(latin)


TIMES = ("prefill_s", "decode_tps", "compress_s")


@pytest.mark.real_model
def test_a_bench_sharded_over_processes_gives_the_records_of_one(tmp_path, tiny_with_real_tokenizer):
    """``torchrun --nproc-per-node 2 -m kvpipe bench`` deals the cases out and merges them back: the same records,
    case by case and in the same order, as ``--nproc-per-node 1`` (times aside)."""
    import os
    import subprocess
    import sys

    model, tokenizer = tiny_with_real_tokenizer
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    suite = write(tmp_path, SUITE.replace("cases: 2", "cases: 3").replace("fidelity: {context: 96, continuation: 16}",
                                                                          f"model: {tmp_path / 'model'}"))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                               str(ranks), "-m", "kvpipe", "bench", str(suite), "--out", str(out), "--no-plots"],
                              capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-4000:]
        lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
        runs[ranks] = [{k: v for k, v in r.items() if k not in TIMES} for r in lines if r["kind"] == "task"]
        assert (out / "report.md").exists()
    assert len(runs[1]) == 2 * 3 * 3
    assert runs[2] == runs[1]
    assert {r.name for r in (tmp_path / "ranks2").iterdir()} >= {"results.rank0.jsonl", "results.rank1.jsonl"}
