"""The pipeline spec: strict pydantic models for what a YAML pipeline may say.

```yaml
version: 1
budget: {keep: 0.5}          # or {tokens: 256} or {bytes: 0.25}
stages:                      # a plain list is a chain; `after:` makes a DAG
  - stage: sinks_window
    params: {sinks: 4, window: 64}
  - attention_mass           # a bare name = the stage with default params
  - uniform
  - topk
```
"""
from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvpipe.core.yaml_source import YamlSource


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


MAX_TOKENS = 1 << 24      # 16M: beyond any model's context; larger numbers are typos (or 1e23)


class Budget(StrictModel):
    """Exactly one of three ways to say how much cache to keep."""

    keep: float | None = Field(None, gt=0, le=1,
                               description="fraction of each row's real tokens kept per layer×KV head")
    tokens: int | None = Field(None, ge=1, le=MAX_TOKENS,
                               description="tokens kept per layer×KV head (mean, for non-uniform allocators)")
    bytes: float | None = Field(None, gt=0, le=1,
                                description="fraction of the uncompressed cache's bytes, metadata included")

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        given = [k for k in ("keep", "tokens", "bytes") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of keep, tokens or bytes (got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("keep", "tokens", "bytes") if getattr(self, k) is not None)

    def __str__(self) -> str:
        return f"{self.kind}={getattr(self, self.kind)}"


class Trigger(StrictModel):
    """When the cache is compressed. ``trigger: prefill`` is short for ``{prefill: true}``."""

    prefill: bool = Field(True, description="compress after the first forward on a fresh cache (the prompt)")
    every: int | None = Field(None, ge=1, le=MAX_TOKENS,
                              description="also compress whenever this many tokens have been added since the last "
                                          "compression (decoding, chunked prefill)")

    @model_validator(mode="after")
    def _something(self) -> Trigger:
        if not self.prefill and self.every is None:
            raise ValueError("this trigger never fires; set prefill: true or every: N")
        return self


class LayerPolicy(StrictModel):
    """What a pipeline does with the layers that are not full attention (full-attention layers get every stage)."""

    sliding: Literal["auto", "keep", "quantize"] = Field(
        "auto", description="sliding-window and chunked layers: keep = as transformers keeps them; quantize = their "
                            "older tokens in the quantize stage's format (needs one); auto = quantize when the "
                            "pipeline quantizes and the window is long enough to save a quarter of its bytes, else "
                            "keep. Their masks stay transformers' own; eviction applies to full-attention layers")


class StageSpec(StrictModel):
    stage: str = Field(description="registered stage name (see `kvpipe stages`)")
    id: str | None = Field(None, description="node id; defaults to the stage name")
    after: list[str] | None = Field(None, description="ids this stage runs after; default: the previous stage")
    params: dict[str, Any] = Field(default_factory=dict, description="the stage's own parameters")

    @property
    def node_id(self) -> str:
        return self.id or self.stage


class PipelineSpec(StrictModel):
    version: Literal[1] = Field(description="spec format version; this kvpipe reads version 1")
    name: str | None = Field(None, description="shown in tables, reports and `Pipeline` reprs")
    description: str | None = Field(None, description="free text for readers")
    budget: Budget | None = Field(None, description="required when the pipeline evicts")
    strict: bool = Field(False, description="a prompt whose protected tokens exceed the budget is an error "
                                            "(for benchmarks); by default they are kept, nothing else is, and "
                                            "`handle.stats()` reports `budget_met: false`")
    trigger: Trigger = Field(default_factory=Trigger,
                             description="when to compress (`prefill`, or `{prefill: true, every: 64}` to keep "
                                         "decoding in budget)")
    layers: LayerPolicy = Field(default_factory=LayerPolicy,
                                description="what happens to sliding-window layers (`{sliding: keep}`)")
    backend: Literal["auto", "torch", "triton"] = Field("auto",
                                                        description="kernels: auto = Triton on CUDA, torch elsewhere")
    stages: list[StageSpec] = Field(description="the stages, in order; `after:` turns the list into a DAG")

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("stages"), list):
            data = {**data, "stages": [{"stage": s} if isinstance(s, str) else s for s in data["stages"]]}
        return data

    @field_validator("trigger", mode="before")
    @classmethod
    def _trigger_shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value != "prefill":
                raise ValueError(f"unknown trigger {value!r}: write `prefill` or a mapping like "
                                 "`{prefill: true, every: 64}`")
            return {"prefill": True}
        return value


def parse_spec(source: YamlSource) -> PipelineSpec:
    """Validate the raw data; raise ``SpecError`` pointing at the first offending key."""
    if not isinstance(source.data, dict):
        raise source.error((), "a pipeline is a mapping with `version:` and `stages:`, "
                               f"got {type(source.data).__name__}")
    try:
        return PipelineSpec.model_validate(source.data)
    except ValidationError as err:
        raise first_error(err, source, (), PipelineSpec) from None


def first_error(err: ValidationError, source: YamlSource, prefix: tuple, model: type[BaseModel]):
    """Turn pydantic's first error into a one-line ``SpecError`` with file, line and key path."""
    # An unknown key usually explains a "field required" next to it (a typo), so report it first.
    errors = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    e = errors[0]
    loc = prefix + tuple(p for p in e["loc"] if not _is_union_tag(p))
    msg = e["msg"].removeprefix("Value error, ")
    if e["type"] == "extra_forbidden":
        allowed = _fields_at(model, [p for p in e["loc"] if not _is_union_tag(p)][:-1])
        msg = f"unknown key {loc[-1]!r}" + did_you_mean(str(loc[-1]), allowed)
        if allowed:
            msg += f" (allowed: {', '.join(sorted(allowed))})"
    elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], (dict, list)):
        msg += f", got {e['input']!r}"
    more = len(errors) - 1
    return source.error(loc, msg + (f" (and {more} more error{'s' * (more > 1)})" if more else ""),
                        at_key=e["type"] == "extra_forbidden")


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_union_tag(part: Any) -> bool:
    # pydantic puts type names like 'float' or 'list[str]' into loc for unions; they are not keys.
    return isinstance(part, str) and ("[" in part or part in ("float", "int", "str", "bool", "none", "function-after"))


def _fields_at(model: type[BaseModel], loc: list) -> set[str]:
    """Field names of the (nested) model that ``loc`` points into, for did-you-mean."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = getattr(field.annotation, "__args__", (field.annotation,)) if field else ()
        inner = [t for t in inner if isinstance(t, type) and issubclass(t, BaseModel)]
        if not inner:
            return set()
        model = inner[0]
    return set(model.model_fields)
