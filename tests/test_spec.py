"""Pipeline specs: shipped pipelines build; every bad spec gives one clear line with its location."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import kvpipe
from kvpipe.core.shipped import DIR as PIPELINES

BAD = sorted((Path(__file__).parent / "bad_specs").glob("*.yaml"))


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_pipelines_build(path):
    pipeline = kvpipe.build(path)
    assert pipeline.spec.version == 1
    assert [s.id for s in pipeline.stages] == [s.node_id for s in pipeline.spec.stages]


def test_corpus_is_large_enough():
    assert len(BAD) >= 20


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_spec_is_one_located_line(path):
    expected = path.read_text().splitlines()[0].removeprefix("# expect: ")
    with pytest.raises(kvpipe.SpecError) as err:
        kvpipe.build(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    assert expected in message, message
    if path.name not in ("syntax_error.yaml", "two_unordered_scorers.yaml", "empty.yaml"):
        assert err.value.line is not None


def test_validate_cli_exits_nonzero_with_the_line():
    bad = BAD[0]
    done = subprocess.run([sys.executable, "-m", "kvpipe", "validate", str(bad)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0 and str(bad) in done.stderr


def test_validate_cli_accepts_a_good_file():
    done = subprocess.run([sys.executable, "-m", "kvpipe", "validate", str(PIPELINES / "default.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "sinks_window -> attention_mass -> uniform -> topk" in done.stdout


def test_build_accepts_path_string_and_dict():
    text = (PIPELINES / "default.yaml").read_text()
    from_path = kvpipe.build(str(PIPELINES / "default.yaml"))
    from_text = kvpipe.build(text)
    import yaml

    from_dict = kvpipe.build(yaml.safe_load(text))
    assert from_path.spec == from_text.spec == from_dict.spec


def test_dict_errors_name_the_key_path():
    with pytest.raises(kvpipe.SpecError, match=r"<dict>: stages\[0\]\.params\.sinks: Input should be a valid integer"):
        kvpipe.build({"version": 1, "stages": [{"stage": "sinks_window", "params": {"sinks": "4"}}]})


def test_string_errors_name_line_and_column():
    with pytest.raises(kvpipe.SpecError, match=r"^<string>:3:9: budget\.keep"):
        kvpipe.build("version: 1\nbudget:\n  keep: 2.0\nstages: [random, uniform, topk]\n")


def test_dag_with_after_runs_in_dependency_order():
    pipeline = kvpipe.build({
        "version": 1, "budget": {"keep": 0.5},
        "stages": [
            {"stage": "topk", "after": ["alloc"]},
            {"stage": "uniform", "id": "alloc", "after": ["score"]},
            {"stage": "random", "id": "score", "after": []},
        ]})
    assert [s.id for s in pipeline.stages] == ["score", "alloc", "topk"]


def test_shipped_pipelines_by_name_and_missing_files():
    assert kvpipe.build("default").spec == kvpipe.build(PIPELINES / "default.yaml").spec
    with pytest.raises(kvpipe.SpecError, match="no such pipeline file.*default, .*noop, random"):
        kvpipe.build("no/such/file.yaml")


def test_yaml_1_2_exponents_are_numbers():
    pipeline = kvpipe.build("version: 1\nbudget: {keep: 1e-1}\nstages: [sinks_window, attention_mass, uniform, topk]\n")
    assert pipeline.spec.budget.keep == 0.1


def test_a_file_that_is_not_utf8_is_one_located_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\nname: caf\xe9\nstages: [noop]\n".encode("latin-1"))
    with pytest.raises(kvpipe.SpecError) as err:
        kvpipe.build(path)
    assert str(err.value) == f"{path}: not UTF-8 text (byte 20); save the file as UTF-8"   # the é


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_validate_cli_gives_one_line_and_exit_1_for_every_bad_spec(path, capsys):
    from kvpipe.cli import main

    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}") and "Traceback" not in err
