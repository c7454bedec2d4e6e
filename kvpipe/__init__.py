"""kvpipe: declarative, composable KV-cache compression for Hugging Face language models.

>>> import kvpipe
>>> handle = kvpipe.build("pipelines/default.yaml").attach(model)
>>> out = model.generate(**inputs, max_new_tokens=64)   # compressed cache, real memory freed
>>> handle.stats()["compression_ratio"]
>>> handle.detach()                                      # model is exactly as before
"""
from kvpipe.errors import BudgetError, KVPipeError, SpecError, UnsupportedModelError
from kvpipe.pipeline import Pipeline, build
from kvpipe.registry import Params, Stage, register

__all__ = ["BudgetError", "KVPipeError", "Params", "Pipeline", "SpecError", "Stage", "UnsupportedModelError",
           "build", "register"]
__version__ = "0.1.0"
