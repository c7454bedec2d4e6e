"""Retention gates: the module, the retention score, training, gate files, and the shipped SmolLM2 gates."""
from __future__ import annotations

import json

import pytest
import torch

import kvpipe
from kvpipe.core.gates import RetentionGates, retention_scores
from kvpipe.errors import KVPipeError
from kvpipe.learned.train import TrainConfig, evaluate, train, training_sequence

from conftest import kept_bytes_ratio, tiny_gates_file, tiny_model


def test_gate_shapes_log_retention_and_shared_readout():
    torch.manual_seed(0)
    gates = RetentionGates(layers=3, heads=2, head_dim=8, hidden=16, bias_init=0.5)
    keys, values = torch.randn(4, 2, 11, 8), torch.randn(4, 2, 11, 8)
    outs = [gates(layer, keys, values) for layer in range(3)]
    assert all(out.shape == (4, 2, 11) and bool((out <= 0).all()) for out in outs)
    assert gates.readout(0) is gates.readout(2)                    # one module, one parameter set
    assert sum(1 for name, _ in gates.named_parameters() if name.startswith("readouts")) == 2
    sum(out.sum() for out in outs).backward()
    weight = gates.readout(0).weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    # every layer contributes to the shared readout's gradient
    for layer in range(3):
        gates.zero_grad()
        gates(layer, keys, values).sum().backward()
        assert gates.readout(0).weight.grad.abs().sum() > 0
    unshared = RetentionGates(layers=3, heads=2, head_dim=8, hidden=16, shared=False)
    assert unshared.readout(0) is not unshared.readout(2)


def test_retention_score_is_age_times_log_beta_and_lookahead_sums_future_mass():
    torch.manual_seed(1)
    log_beta = -torch.rand(2, 3, 7) * 0.5
    positions = torch.randint(0, 40, (2, 3, 7))
    nxt = torch.tensor([45, 50])
    one = retention_scores(log_beta, positions, nxt)
    torch.testing.assert_close(one, (nxt[:, None, None] - positions) * log_beta)
    n = 5
    ahead = retention_scores(log_beta, positions, nxt, lookahead=n)
    a = (nxt[:, None, None] - positions + 1).double()
    brute = torch.logsumexp(torch.stack([(a + k) * log_beta.double() for k in range(n)]), 0)
    torch.testing.assert_close(ahead.double(), brute, rtol=1e-5, atol=1e-5)


def test_gate_file_refuses_another_model_shape(tmp_path):
    path = tiny_gates_file(tmp_path)
    gates, record = RetentionGates.load(path)
    assert record["note"].startswith("untrained")
    with pytest.raises(KVPipeError, match=r"trained for 2 layers x 2 KV heads x head_dim 16.*kvpipe train-gates"):
        gates.check_shape(30, 3, 64, path)
    model = tiny_model(num_hidden_layers=3)
    pipeline = kvpipe.build({"version": 1, "budget": {"keep": 0.5},
                             "stages": [{"stage": "retention_gates", "params": {"gates": path}}, "global", "topk"]})
    with pipeline.attach(model), pytest.raises(KVPipeError, match="this model has 3 x 2 x 16"):
        model(torch.randint(2, 250, (1, 40)))
    with pytest.raises(KVPipeError, match="no retention gate file"):
        RetentionGates.load(tmp_path / "missing.safetensors")


def test_short_training_lowers_the_loss_and_checkpoints_reload_exactly(smollm, tmp_path):
    _, tokenizer = smollm
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0)
    config = TrainConfig(steps=8, context=96, budget=8, lr=3e-2, hidden=8, bias_init=3.0, checkpoint_every=4)
    before = {name: p.clone() for name, p in model.named_parameters()}
    untrained, _ = train(model, tokenizer, TrainConfig(**{**config.__dict__, "steps": 0}), tmp_path / "0",
                         progress=False)
    gates, history = train(model, tokenizer, config, tmp_path, progress=False)
    # on sequences it trained on, the loss of the trained gates is below that of the same gates untrained
    for step in (0, 1):
        ids = training_sequence(tokenizer, config, step)
        assert evaluate(model, gates, ids, config)[0] < evaluate(model, untrained, ids, config)[0]
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())     # the model stayed frozen
    loaded, record = RetentionGates.load(tmp_path / "gates.safetensors")
    assert record["steps"] == 8 and record["config"]["budget"] == 8
    keys, values = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    for layer in range(2):
        assert torch.equal(loaded(layer, keys, values), gates(layer, keys, values).detach())
    # resuming at the last checkpoint (step 4 of 8) reproduces the same run
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["step"] == 8
    again = tmp_path / "again"
    train(model, tokenizer, TrainConfig(**{**config.__dict__, "steps": 4}), again, progress=False)
    resumed, resumed_history = train(model, tokenizer, config, again, resume=True, progress=False)
    assert [h["step"] for h in resumed_history] == list(range(1, 9))
    torch.testing.assert_close(torch.tensor([h["kl"] for h in resumed_history]),
                               torch.tensor([h["kl"] for h in history]), rtol=1e-4, atol=1e-6)


def test_distilled_gates_learn_the_reconstruction_scores_and_score_with_them(smollm, tmp_path):
    """``--target reconstruction``: the teacher is the shipped ``reconstruction`` stage's scores; a few steps
    lower the gates' error to them on the sequences trained on; the stage then scores with ``log β`` itself."""
    from kvpipe.learned import distill
    from kvpipe.runtime.pipeline import build

    _, tokenizer = smollm
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id or 0)
    config = TrainConfig(steps=6, context=96, lr=3e-2, hidden=8, bias_init=-4.0, target="reconstruction")
    untrained, _ = train(model, tokenizer, TrainConfig(**{**config.__dict__, "steps": 0}), tmp_path / "0",
                         progress=False)
    gates, history = train(model, tokenizer, config, tmp_path, progress=False)
    assert set(history[0]) == {"step", "mse"}
    for step in (0, 1):
        targets = distill.teacher_targets(model, tokenizer, distill.training_text(tokenizer, 96, 0, step))
        assert distill.distill_loss(gates, targets) < distill.distill_loss(untrained, targets)
        # the teacher is the stage's own definition: every score an attention probability, some near 1
        scores = torch.stack([t.exp() for _, _, t in targets])
        assert float(scores.max()) <= 1 + 1e-4 and float(scores.max()) > 0.1
    record = RetentionGates.load(tmp_path / "gates.safetensors")[1]
    assert record["target"] == "reconstruction" and "mse_last10" in record
    spec = {"version": 1, "budget": {"keep": 0.5}, "stages": [
        {"stage": "retention_gates", "params": {"gates": str(tmp_path / "gates.safetensors")}},
        {"stage": "global", "params": {"calibration": "none"}}, "topk"]}
    assert next(s for s in build(spec).stages if s.id == "retention_gates").predicts_scores
    ids = torch.randint(2, 250, (1, 60))
    with build(spec).attach(model) as handle:
        model(ids, past_key_values=handle.cache())
        assert handle.stats()["kv_bytes"] < handle.stats()["kv_bytes_peak"]
    bad = {**spec, "stages": [{**spec["stages"][0], "params": {**spec["stages"][0]["params"], "lookahead": 4}},
                              *spec["stages"][1:]]}
    with build(bad).attach(model) as handle, pytest.raises(KVPipeError, match="predict the score itself"):
        model(ids, past_key_values=handle.cache())


@pytest.mark.real_model
def test_shipped_gates_load_for_smollm2_and_generate(smollm):
    model, tokenizer = smollm
    gates, record = RetentionGates.load("smollm2-135m")
    assert (gates.layers, gates.heads, gates.head_dim) == (30, 3, 64) and record["steps"] > 0
    ids = tokenizer("\n".join(["The quick brown fox jumps over the lazy dog."] * 30), return_tensors="pt").input_ids
    with kvpipe.build("learned-global").attach(model) as handle:
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        stats = handle.stats()
    assert out.shape[1] == ids.shape[1] + 4
    assert kept_bytes_ratio(stats) > 1.5


@pytest.mark.parametrize("shared", [True, False])
def test_parameter_shapes_are_those_of_the_built_gates(shared):
    gates = RetentionGates(3, 2, 8, hidden=5, shared=shared)
    built = {name: tuple(p.shape) for name, p in gates.named_parameters()}
    assert RetentionGates.parameter_shapes(3, 2, 8, 5, shared) == built


BROKEN = {"empty": "not a valid kvpipe retention gate file", "truncated": "not a valid kvpipe retention gate file",
          "pickled": "not a valid kvpipe retention gate file", "bad metadata": "shape: invalid JSON",
          "wrong shapes": "shape.hidden: Field required", "nan weights": "holds NaN or inf",
          "huge shape": "missing: gates of this shape have 4098 tensors",
          "record list": "record: expected a JSON object",
          "record string": "record: expected a JSON object", "record target": "record.target: Input should be",
          "deep record": "record: JSON nested deeper",
          "float tensor": "readouts.0.weight: F16 .2, 8. where the shape metadata needs F32",
          "extra tensor": "evil: not a tensor of retention gates"}


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_gate_files_are_one_clear_error(tmp_path, kind):
    """Each fails before the gates are built (a 180-byte file claiming 1024 layers once took 99 s and 3.4 GB)."""
    import json
    import pickle
    import time

    from safetensors import safe_open
    from safetensors.torch import save_file

    from kvpipe.core.gates import RetentionGates
    from kvpipe.errors import FileError

    good = tiny_gates_file(tmp_path)
    with safe_open(good, "pt") as file:
        metadata, tensors = file.metadata(), {name: file.get_tensor(name) for name in file.keys()}
    path = tmp_path / f"{kind.replace(' ', '-')}.safetensors"
    edits = {"huge shape": {"shape": json.dumps({"layers": 1024, "heads": 1024, "head_dim": 4096, "hidden": 8192})},
             "record list": {"record": "[1, 2]"}, "record string": {"record": '"kl"'},
             "record target": {"record": '{"target": "nonsense"}'},
             "deep record": {"record": "[" * 50000 + "]" * 50000}}
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(open(good, "rb").read()[:200])
    elif kind == "pickled":
        path.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
    elif kind == "bad metadata":
        save_file({"w": torch.ones(2)}, str(path), metadata={"shape": "{not json"})
    elif kind == "wrong shapes":
        save_file({"w": torch.ones(2)}, str(path), metadata={"shape": '{"layers": 2, "heads": 2, "head_dim": 16}'})
    elif kind in edits:
        save_file(tensors, str(path), metadata={**metadata, **edits[kind]})
    elif kind == "float tensor":
        save_file({**tensors, "readouts.0.weight": tensors["readouts.0.weight"].half()}, str(path), metadata)
    elif kind == "extra tensor":
        save_file({**tensors, "evil": torch.ones(3)}, str(path), metadata)
    else:
        gates, _ = RetentionGates.load(good)
        with torch.no_grad():
            next(gates.parameters())[0] = float("nan")
        gates.save(str(path), {"note": "poisoned"})
    started = time.perf_counter()
    with pytest.raises(FileError, match=BROKEN[kind]) as err:
        RetentionGates.load(path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))
    assert time.perf_counter() - started < 2


def test_a_bad_gate_file_fails_at_build_naming_the_yaml_line_and_the_file(tmp_path):
    """Not at the first compressing forward: build() reads the gate file."""
    from kvpipe.errors import SpecError

    (tmp_path / "gates.safetensors").write_bytes(b"junk")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("version: 1\nbudget: {keep: 0.5}\nstages:\n  - stage: retention_gates\n"
                        f"    params: {{gates: {tmp_path / 'gates.safetensors'}}}\n  - uniform\n  - topk\n")
    with pytest.raises(SpecError, match=r"p.yaml:5:\d+: stages\[0\].params: .*gates.safetensors: not a valid"):
        kvpipe.build(pipeline)
    pipeline.write_text(pipeline.read_text().replace(str(tmp_path / "gates.safetensors"), "missing.safetensors"))
    with pytest.raises(SpecError, match=r"stages\[0\].params: no retention gate file 'missing.safetensors'"):
        kvpipe.build(pipeline)
