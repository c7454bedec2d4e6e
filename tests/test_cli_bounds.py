"""Every command-line mistake of ``tests/bad_cli/cases.yaml`` is one line on stderr and exit 1, before the model
loads where the mistake does not depend on the model (a typo never costs a model load or a traceback)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

import kvpipe.errors
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


@pytest.mark.parametrize("argv", [["run", "default", "--cases", "1"], ["diagnose", "default", "--cases", "1"],
                                  ["train-gates", "--steps", "1"], ["bench", "benchmarks/suites/smoke.yaml"]])
def test_device_and_dtype_reach_the_model_loader(argv, tmp_path, monkeypatch):
    """Parsed and passed (the CPU's; a GPU's are parsed the same): the loader is asked for them."""
    asked = {}

    def recording_load(name, **kwargs):
        asked.update(kwargs)
        raise kvpipe.errors.KVPipeError("stop here")

    monkeypatch.setattr(kvpipe.models, "load", recording_load)
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).parents[1]
    argv = [str(root / arg) if arg.endswith(".yaml") else arg for arg in argv]
    device = ["--devices", "cpu"] if argv[0] == "bench" else ["--device", "cpu"]
    assert exit_code([*argv, *device, "--dtype", "bf16"]) == 1
    assert asked["device"] == "cpu" and asked["dtype"] == "bf16"


@pytest.mark.real_model
def test_load_puts_the_model_on_the_device_and_dtype_asked_for():
    model, _ = kvpipe.models.load("smollm2-135m", device="cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert kvpipe.models.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
