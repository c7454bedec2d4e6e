"""Which model a cache was filled by, so that a cache never feeds another model.

Keys and values are the output of one model's weights at one model's positions: a cache from a model of the same
KV shape but other weights, another ``rope_theta``, other query heads or another vocabulary loads without a shape
error and answers wrongly. A cache file therefore records

* ``config`` — the model's configuration, less what does not change what the cache holds (paths, versions,
  the attention implementation, output flags), so that a refusal can name the setting that differs;
* ``fingerprint`` — SHA-256 of a few thousand values from the first, middle and last weight this process holds
  (a tensor-parallel rank hashes its own shards: its file is read by the same rank).
"""
from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# settings that say how the model runs or where it came from, not what its keys and values are
RUNTIME_SETTINGS = frozenset({
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_attn_implementation",
    "attn_implementation", "_attn_implementation_autoset", "_experts_implementation", "output_attentions",
    "output_hidden_states", "return_dict", "use_return_dict", "torchscript", "tp_plan", "base_model_tp_plan",
    "base_model_pp_plan", "base_model_ep_plan", "pretraining_tp",
})
SAMPLED_VALUES = 4096


def model_identity(model: PreTrainedModel) -> dict[str, object]:
    """``{"config": ..., "fingerprint": ...}``: what a cache file records of the model that filled it."""
    return {"config": model_config(model), "fingerprint": weights_fingerprint(model)}


def model_config(model: PreTrainedModel) -> dict[str, object]:
    """The configuration that shapes the cache, as JSON values."""
    settings = {key: value for key, value in model.config.to_dict().items() if key not in RUNTIME_SETTINGS}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def weights_fingerprint(model: PreTrainedModel) -> str:
    """Hex SHA-256 of ``SAMPLED_VALUES`` values (as float32) of the first, middle and last parameter held here
    (offloaded ones, on the meta device until their layer runs, are passed over)."""
    parameters = [parameter for parameter in model.parameters() if not parameter.is_meta]
    digest = hashlib.sha256()
    for parameter in (parameters[0], parameters[len(parameters) // 2], parameters[-1]):
        local = parameter.to_local() if hasattr(parameter, "to_local") else parameter   # a DTensor's own shard
        digest.update(local.detach().reshape(-1)[:SAMPLED_VALUES].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def config_differences(saved: dict[str, object], here: dict[str, object], limit: int = 4) -> list[str]:
    """``"name saved (this model: value)"`` for the settings that differ, at most ``limit`` of them."""
    names = sorted(name for name in saved.keys() | here.keys() if saved.get(name) != here.get(name))
    return [f"{name} {_short(saved.get(name))} (this model: {_short(here.get(name))})" for name in names[:limit]]


def _short(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
