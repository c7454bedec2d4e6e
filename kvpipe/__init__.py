"""kvpipe: declarative, composable KV-cache compression for Hugging Face language models.

>>> import kvpipe
>>> handle = kvpipe.build("pipelines/default.yaml").attach(model)
>>> out = model.generate(**inputs, max_new_tokens=64)   # compressed cache, real memory freed
>>> handle.stats()["compression_ratio"]
>>> handle.detach()                                      # model is exactly as before
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING

from kvpipe.errors import BudgetError, KVPipeError, SpecError, UnsupportedModelError
from kvpipe.version import __version__

if TYPE_CHECKING:
    from kvpipe.core.registry import Params, Stage, register
    from kvpipe.runtime.cache_file import load_cache, save_cache
    from kvpipe.runtime.pipeline import Pipeline, build

# The kernels, stages and shipped pipelines are the top-level folders of the source tree; an install maps them to
# kvpipe.kernels, kvpipe.stages and kvpipe.pipelines (pyproject.toml). A checkout used without installing
# (PYTHONPATH=.) finds them here: its root joins the folders this package's submodules are looked for in.
_CHECKOUT = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "kernels").is_dir() and (_CHECKOUT / "kernels" / "triton_decode.py").is_file():
    __path__.append(str(_CHECKOUT))

# torch, transformers and the stages load on first use, so that `kvpipe --help` starts at once
_LAZY = {"Pipeline": "kvpipe.runtime.pipeline", "build": "kvpipe.runtime.pipeline", "Params": "kvpipe.core.registry",
         "Stage": "kvpipe.core.registry", "register": "kvpipe.core.registry",
         "save_cache": "kvpipe.runtime.cache_file", "load_cache": "kvpipe.runtime.cache_file"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvpipe' has no attribute {name!r}")


__all__ = ["BudgetError", "KVPipeError", "Params", "Pipeline", "SpecError", "Stage", "UnsupportedModelError",
           "__version__", "build", "load_cache", "register", "save_cache"]
