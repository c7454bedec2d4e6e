"""Built-in stages (``kvpipe.stages``). Importing this package registers them all.

A stage is one module here plus its ``@register`` line; ``kvpipe stages`` lists them with their parameters.
"""
from kvpipe.stages import attention_mass, random_score, sinks_window, topk, uniform  # noqa: F401
