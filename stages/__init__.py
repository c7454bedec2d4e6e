"""Built-in stages (``kvpipe.stages``). Importing this package registers them all.

A stage is one module here plus its ``@register`` line; ``kvpipe stages`` lists them with their parameters.
"""
from kvpipe.stages import (  # noqa: F401
    adaptive_heads,
    attention_mass,
    combine,
    coupled_projection,
    critical,
    expected_attention,
    global_budget,
    key_norm_prefilter,
    knorm,
    output_change,
    pyramid,
    quantize,
    quest_pages,
    random_score,
    recover_evidence,
    refit_values,
    recency,
    retention_gates,
    sinks_window,
    snapkv,
    topk,
    tova,
    uniform,
    vatp,
)
