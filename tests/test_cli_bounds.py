"""Every command-line mistake of ``tests/bad_cli/cases.yaml`` is one line on stderr and exit 1, before the model
loads where the mistake does not depend on the model (a typo never costs a model load or a traceback)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import kvpipe.models
from kvpipe.cli import main

CASES = yaml.safe_load((Path(__file__).parent / "bad_cli" / "cases.yaml").read_text())


def prepare(tmp_path: Path, setup: str | None) -> None:
    if setup == "file":
        (tmp_path / "file").write_text("a file, not a folder")
    elif setup == "empty folder":
        (tmp_path / "empty").mkdir()
    elif setup in ("checkpoint", "corrupt checkpoint"):
        (tmp_path / "ckpt").mkdir()
        state = {"step": 4, "config": {"hidden": 8, "shared": True, "target": "kl"}, "optimizer": {}, "history": []}
        (tmp_path / "ckpt" / "state.json").write_text(json.dumps(state) if setup == "checkpoint" else '{"step": ')


@pytest.mark.parametrize("case", [c for c in CASES if not c.get("model")], ids=lambda c: " ".join(c["argv"])[:70])
def test_a_bad_command_line_is_one_line_and_exit_1(case, tmp_path, monkeypatch, capsys):
    if case.get("cpu_only") and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    prepare(tmp_path, case.get("setup"))
    if not case.get("loads"):
        def no_model(*args, **kwargs):
            raise AssertionError("the model was loaded before the mistake was found")
        monkeypatch.setattr(kvpipe.models, "load", no_model)
    code = exit_code([arg.replace("{tmp}", str(tmp_path)) for arg in case["argv"]])
    err = capsys.readouterr().err
    assert code == 1, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(case["error"], err), err


@pytest.mark.real_model
@pytest.mark.parametrize("case", [c for c in CASES if c.get("model")], ids=lambda c: " ".join(c["argv"])[:70])
def test_a_context_beyond_the_models_positions_is_refused_once_it_is_known(case, smollm, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.setattr(kvpipe.models, "load", lambda *args, **kwargs: smollm)
    monkeypatch.chdir(tmp_path)                       # where diagnose/ and gates/ would be written
    argv = [str(Path(__file__).parents[1] / arg) if arg.endswith(".yaml") else arg for arg in case["argv"]]
    assert exit_code(argv) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(case["error"], err), err


def exit_code(argv: list[str]) -> int:
    """What ``kvpipe ARGV`` exits with (argparse's refusals exit through ``SystemExit``)."""
    try:
        return main(argv)
    except SystemExit as done:
        return done.code
