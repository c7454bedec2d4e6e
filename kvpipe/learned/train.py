"""``kvpipe train-gates``: train retention gates with the model frozen (TrimKV's recipe, DBTrimKV's global capacity),
or (``target="reconstruction"``) distil them from KVzip's reconstruction scores (``kvpipe.learned.distill``).

KL target. Loss = forward KL of the full-cache model's next-token distribution to the **soft-retention** model's, plus
``capacity_weight`` × a hinge on the summed retention. Soft retention makes forgetting differentiable: every
attention logit gets ``(t − i)·log β_i`` added, so a token with small β fades for queries far after it, as
eviction would remove it. The capacity term (global form) pushes ``Σ_{layers, heads} Σ_{i≤t} β_i^{t−i}``, the
expected number of tokens each head still holds at step t, below ``budget × layers × heads``.

Data, all local and seeded by ``seed + step``: windows of Python-documentation prose, and needle / multi-key /
multi-value / variable-tracking tasks with their answer appended, so the gates learn to keep evidence.
Checkpoints (safetensors: gates, optimiser moments, and a JSON record) every ``checkpoint_every`` steps;
``resume`` continues from the last one and reproduces the same run.
"""
from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import AttentionInterface

from kvpipe.core.gate_file import read_gate_file
from kvpipe.core.gates import RetentionGates
from kvpipe.core.spec import StrictModel
from kvpipe.core.untrusted import bounded_json, validated
from kvpipe.errors import FileError
from kvpipe.eval.tasks import make_cases, paragraphs
from kvpipe.learned import distill
from kvpipe.runtime.adapters import attention_modules, decoder_layers, find_decoder, kv_shape

TRAINING_ATTENTION = "kvpipe_retention_training"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    context: int = 512                # tokens per training sequence
    budget: int = 64                  # soft capacity M: tokens per head on average
    lr: float = 1e-2
    weight_decay: float = 0.01
    capacity_weight: float = 1.0
    hidden: int = 64                  # gate MLP width
    bias_init: float = 5.0            # β ≈ 0.993 at the start (the papers' 10 needs far more steps than a CPU run)
    shared: bool = True               # one readout for all layers (DBTrimKV) or one per layer
    seed: int = 0
    checkpoint_every: int = 50
    target: str = "kl"                # "kl" (soft retention vs the full model) or "reconstruction" (distil)

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ValueError(f"unknown training target {self.target!r}; one of {', '.join(TARGETS)}")


TARGETS = {"kl": "pydoc_data.topics prose windows + needle/multikey/multivalue/vartrack tasks with answers",
           "reconstruction": "pydoc_data.topics prose windows with facts in templates of kvpipe.learned.distill"}


def retention_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA with ``(t − i)·log β_i`` added to every causal logit; keeps ``log S_t`` for the capacity loss.

    ``query [B, Hq, T, D]``, ``key``/``value [B, Hkv, T, D]`` (one full sequence, no cache, no padding).
    """
    gates: RetentionGates = module._kvpipe_gates
    log_beta = gates(module.layer_idx, key, value)                                   # [B, Hkv, T]
    steps = key.shape[2]
    age = (torch.arange(steps)[:, None] - torch.arange(steps)[None, :]).to(key.device)  # t - i
    bias = (age.clamp(min=0) * log_beta[:, :, None, :]).masked_fill(age < 0, float("-inf"))  # [B, Hkv, T, T]
    module._kvpipe_log_capacity = torch.logsumexp(bias, -1)                          # [B, Hkv, T]: log S_t
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
        attn_mask=bias.repeat_interleave(groups, 1).to(query.dtype), scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def losses(model, gates: RetentionGates, ids: torch.Tensor, config: TrainConfig) -> tuple[torch.Tensor, float, float]:
    """``(total, kl, capacity)`` on one sequence ``ids long [1, T]``."""
    with torch.no_grad():
        teacher = model(ids).logits.float().log_softmax(-1)
    base = model.config._attn_implementation
    model.config._attn_implementation = TRAINING_ATTENTION
    try:
        student = model(ids).logits.float().log_softmax(-1)
    finally:
        model.config._attn_implementation = base
    kl = (teacher.exp() * (teacher - student)).sum(-1).mean()
    attention: list[Any] = [layer.self_attn for layer in decoder_layers(find_decoder(model))]   # with _kvpipe_*
    held = torch.stack([a._kvpipe_log_capacity for a in attention]).exp().sum((0, 2))     # [B, T]: Σ_{l,h} S
    slots = len(attention) * gates.heads
    t_global = (torch.arange(ids.shape[1], device=ids.device) + 1) * slots
    hinge = torch.relu((held - config.budget * slots) / (t_global - config.budget * slots).clamp(min=1))
    capacity = hinge.sum() / (hinge > 0).sum().clamp(min=1)
    return kl + config.capacity_weight * capacity, float(kl), float(capacity)


TRAIN_KINDS = ("single", "multikey", "multivalue", "vartrack")  # retrieval: what gates must learn to keep


def training_sequence(tokenizer, config: TrainConfig, step: int) -> torch.Tensor:
    """Step ``step``'s sequence: prose every other step, else a generated task with its answer appended."""
    rng = random.Random(config.seed * 100_003 + step)
    if step % 2 == 0:
        prose = paragraphs()
        start = rng.randrange(len(prose))
        text = "\n".join(prose[start:start + 40])
        return tokenizer(text, return_tensors="pt").input_ids[:, :config.context]
    kind = TRAIN_KINDS[(step // 2) % len(TRAIN_KINDS)]
    case = make_cases(tokenizer, config.context - 80, 1, seed=rng.randrange(10**9), kind=kind)[0]
    answer = tokenizer(" ".join(case.answers), add_special_tokens=False, return_tensors="pt").input_ids
    return torch.cat([case.ids, answer], -1)


def train(model, tokenizer, config: TrainConfig, out: Path, resume: bool = False,
          progress: bool = True) -> tuple[RetentionGates, list[dict]]:
    """Train gates for ``model`` (frozen); returns them and the per-step history. Writes ``out/gates.safetensors``
    (the gates and a record), ``out/optimizer.safetensors`` and ``out/state.json`` at every checkpoint."""
    decoder = find_decoder(model)
    kv_heads, head_dim = kv_shape(model)
    torch.manual_seed(config.seed)
    gates = RetentionGates(len(decoder_layers(decoder)), kv_heads, head_dim, config.hidden,
                           config.bias_init, config.shared)
    optimizer = torch.optim.AdamW(gates.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history, start = [], 0
    if resume and (out / "state.json").is_file():
        state = checkpoint_state(out, config)
        _, _, tensors = read_gate_file(out / "gates.safetensors", RetentionGates.parameter_shapes)
        try:
            gates.load_state_dict(tensors)
            _load_optimizer(optimizer, load_file(str(out / "optimizer.safetensors")), state.optimizer)
        except (OSError, SafetensorError, RuntimeError, KeyError, ValueError) as err:
            raise FileError(out, "optimizer.safetensors", f"does not match the checkpoint's gates ({err}); "
                                                          "start a new --out") from None
        history, start = state.history, state.step
    model.requires_grad_(False)
    started = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc="train gates", unit="step", disable=not progress,
               initial=start, total=config.steps)
    with gates_on(model, gates):
        for step in bar:
            total, metrics = step_loss(model, tokenizer, gates, config, step)
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            history.append({"step": step + 1, **metrics})
            bar.set_postfix({name: f"{value:.4f}" for name, value in metrics.items()})
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                save_checkpoint(gates, optimizer, config, history, out, time.perf_counter() - started)
    return gates, history


def step_loss(model, tokenizer, gates: RetentionGates, config: TrainConfig, step: int):
    """``(loss, {metric: value})`` of step ``step`` for the config's target."""
    if config.target == "reconstruction":
        ids = distill.training_text(tokenizer, config.context, config.seed, step)
        loss = distill.distill_loss(gates, distill.teacher_targets(model, tokenizer, ids))
        return loss, {"mse": float(loss.detach())}
    total, kl, capacity = losses(model, gates, training_sequence(tokenizer, config, step), config)
    return total, {"kl": kl, "capacity": capacity}


@contextlib.contextmanager
def gates_on(model, gates: RetentionGates):
    """Let ``losses`` run ``model`` with soft retention from ``gates`` (the attention reads them per layer)."""
    AttentionInterface.register(TRAINING_ATTENTION, retention_attention)
    attention = attention_modules(model)
    for module in attention:
        vars(module)["_kvpipe_gates"] = gates
    try:
        yield
    finally:
        for module in attention:
            del vars(module)["_kvpipe_gates"]


def evaluate(model, gates: RetentionGates, ids: torch.Tensor, config: TrainConfig) -> tuple[float, float, float]:
    """``(total, kl, capacity)`` of ``gates`` on ``ids [1, T]``, no gradient."""
    with gates_on(model, gates), torch.no_grad():
        total, kl, capacity = losses(model, gates, ids, config)
    return float(total), kl, capacity


def save_checkpoint(gates: RetentionGates, optimizer, config: TrainConfig, history: list[dict], out: Path,
                    seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    gates.save(out / "gates.safetensors", record(config, history, seconds))
    tensors, layout = _optimizer_tensors(optimizer)
    save_file(tensors, str(out / "optimizer.safetensors"))
    (out / "state.json").write_text(json.dumps({"step": history[-1]["step"] if history else 0,
                                                "config": asdict(config), "optimizer": layout,
                                                "history": history}))


class CheckpointState(StrictModel):
    """``state.json`` of a checkpoint folder."""

    model_config = ConfigDict(extra="forbid", strict=False, frozen=True)
    step: int = Field(ge=0)
    config: dict[str, object]
    optimizer: dict[str, object]
    history: list[dict[str, int | float]]


RESUMED_SETTINGS = ("hidden", "shared", "target")     # what the checkpoint's gates and objective are


def checkpoint_state(out: Path, config: TrainConfig) -> CheckpointState:
    """The checkpoint in ``out``, checked for a run of ``config`` to resume: readable, of gates of the same width,
    readout and target, and not already past ``config.steps``. Other settings (learning rate, budget, steps) may
    change between runs."""
    path = out / "state.json"
    if not path.is_file():
        raise FileError(path, "", "no checkpoint to resume here (train without --resume first)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise FileError(path, "", f"cannot read it ({err})") from None
    state = validated(path, CheckpointState, bounded_json(path, "", text, max_chars=1 << 28))
    for name in RESUMED_SETTINGS:
        if state.config.get(name) != getattr(config, name):
            raise FileError(path, f"config.{name}", f"the checkpoint was trained with {name} "
                                                    f"{state.config.get(name)!r} and this run asks for "
                                                    f"{getattr(config, name)!r}; resume with the same {name}, or "
                                                    "train into another --out")
    if state.step >= config.steps:
        raise FileError(path, "step", f"the checkpoint has already trained {state.step} steps; give --steps above "
                                      "that to train on")
    return state


def record(config: TrainConfig, history: list[dict], seconds: float) -> dict:
    """What a gate file says about itself: training settings, data, and a summary of the loss curve."""
    def mean(key, part):
        return sum(h[key] for h in part) / max(len(part), 1)
    head, tail = history[:10], history[-10:]
    metrics = [key for key in (history[0] if history else {}) if key != "step"]
    return {"config": asdict(config), "steps": len(history), "seconds_this_run": round(seconds, 1),
            "target": config.target, "data": TARGETS[config.target],
            **{f"{key}_first10": mean(key, head) for key in metrics},
            **{f"{key}_last10": mean(key, tail) for key in metrics}}


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, layout = {}, {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        layout["state"][str(index)] = {}
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.contiguous()
                layout["state"][str(index)][key] = "tensor"
            else:
                layout["state"][str(index)][key] = value
    return tensors, layout


def _load_optimizer(optimizer, tensors: dict[str, torch.Tensor], layout: dict) -> None:
    state = {int(index): {key: tensors[f"{index}.{key}"] if value == "tensor" else value
                          for key, value in entry.items()}
             for index, entry in layout["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": layout["param_groups"]})
