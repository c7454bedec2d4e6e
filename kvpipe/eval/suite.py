"""A benchmark suite: strict pydantic models for what a suite YAML may say, loaded with file:line errors.

```yaml
version: 1
name: smoke
contexts: [1024]               # prompt tokens up to the question
tasks: [single, multikey, vartrack, common_words, prose_qa]
cases: 2                       # per task and context
budgets: [{keep: 0.25}, {bytes: 0.125}]
pipelines:                     # shipped names or paths relative to this file
  - default
  - {pipeline: int4, budgets: own}   # its own budget (quantization only)
peers: [hqq-int4, kvpress-snapkv]
fidelity: {context: 1024, continuation: 128}
```
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from kvpipe.core.spec import Budget, StrictModel, did_you_mean, first_error
from kvpipe.core.yaml_source import YamlSource, load_file
from kvpipe.errors import SpecError
from kvpipe.eval.contenders import PEERS
from kvpipe.eval.tasks import KINDS
from kvpipe.eval.tasks.haystack import Haystack


class PipelineEntry(StrictModel):
    pipeline: str = Field(description="shipped pipeline name or YAML path (relative to the suite file)")
    label: str | None = Field(None, description="name in tables and plots; default: the file's stem")
    budgets: list[Budget] | Literal["own"] | None = Field(
        None, description="budgets for this pipeline; `own` = the one in its file; default: the suite's")

    @field_validator("budgets", mode="before")
    @classmethod
    def _own_or_list(cls, value):
        if isinstance(value, str) and value != "own":
            raise ValueError(f"write a list of budgets, or `own` for the budget in the pipeline file; got {value!r}")
        return value


class FidelitySpec(StrictModel):
    context: int = Field(1024, ge=64, description="tokens of held-out prose compressed")
    continuation: int = Field(128, ge=8, description="tokens teacher-forced after it; KL and perplexity over these")


class SuiteSpec(StrictModel):
    version: Literal[1] = Field(description="suite format version; this kvpipe reads version 1")
    name: str = Field(description="the suite's name: report title and default output folder")
    description: str | None = Field(None, description="free text, shown nowhere but the file")
    model: str = Field("smollm2-135m", description="'smollm2-135m' (embedded) or a HF model id / path")
    seed: int = Field(0, description="seed of every generated case")
    cases: int = Field(3, ge=1, description="cases per task and context length")
    contexts: list[int] = Field(description="prompt lengths in tokens (chat header + context)", min_length=1)
    tasks: list[str] = Field(description=f"task kinds: {', '.join(KINDS)}", min_length=1)
    needles: int = Field(3, ge=2, description="facts per multi-needle case (keys, values or hops)")
    haystack: Haystack = Field("prose", description="prose (Python docs) or filler (RULER's noise)")
    questions: Literal["agnostic", "aware", "both"] = Field(
        "agnostic", description="agnostic: the context is compressed before the question is seen (kvpress's "
                                "protocol); aware: the question is compressed with it")
    questions_per_context: int = Field(
        1, ge=1, description="the multi-question protocol: each `single` context hides this many facts under "
                             "different keys; every contender compresses it once and is asked about each fact on "
                             "its own fork (cases = contexts; answers = cases × questions_per_context)")
    budgets: list[Budget] = Field(default_factory=list, description="budgets every pipeline and kvpress peer runs at")
    pipelines: list[PipelineEntry] = Field(default_factory=list, description="kvpipe pipelines to compare")
    peers: list[str] = Field(default_factory=list, description=f"other libraries: {', '.join(PEERS)}")
    fidelity: FidelitySpec | None = Field(None, description="KL and perplexity on held-out prose; omit to skip")

    @model_validator(mode="before")
    @classmethod
    def _expand_shorthand(cls, data):
        if isinstance(data, dict) and isinstance(data.get("pipelines"), list):
            data = {**data, "pipelines": [{"pipeline": p} if isinstance(p, str) else p for p in data["pipelines"]]}
        return data

    @field_validator("contexts")
    @classmethod
    def _long_enough(cls, contexts: list[int]) -> list[int]:
        short = [c for c in contexts if c < 256]
        if short:
            raise ValueError(f"contexts must be at least 256 tokens (the chat header and the facts need room), "
                             f"got {short}")
        return contexts

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        return [_known(t, KINDS, "task") for t in tasks]

    @field_validator("peers")
    @classmethod
    def _known_peers(cls, peers: list[str]) -> list[str]:
        return [_known(p, PEERS, "peer") for p in peers]


def _known(value: str, choices, what: str) -> str:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}{did_you_mean(value, choices)} (one of {', '.join(choices)})")
    return value


def load_suite(path: str | Path) -> tuple[SuiteSpec, YamlSource]:
    """Read and validate a suite file; any mistake raises ``SpecError`` naming the file, line and key."""
    path = Path(path)
    if not path.is_file():
        raise SpecError("no such suite file (benchmarks/suites/ has ready ones)", str(path))
    source = load_file(path)
    if not isinstance(source.data, dict):
        raise source.error((), f"a suite is a mapping with `version:`, `name:`, `contexts:`, `tasks:` ..., "
                               f"got {type(source.data).__name__}")
    try:
        suite = SuiteSpec.model_validate(source.data)
    except ValidationError as err:
        raise first_error(err, source, (), SuiteSpec) from None
    _check_consistent(suite, source)
    return suite, source


def _check_consistent(suite: SuiteSpec, source: YamlSource) -> None:
    """Rules between keys, reported at the key that has to change."""
    if not suite.pipelines and not suite.peers:
        raise source.error(("pipelines",), "list at least one pipeline or peer to compare with the full cache")
    for i, entry in enumerate(suite.pipelines):
        if entry.budgets is None and not suite.budgets:
            raise source.error(("pipelines", i), f"{entry.pipeline!r} takes the suite's budgets, but `budgets:` is "
                                                 "empty; add budgets, or write `budgets: own` for this pipeline")
    kvpress = [p for p in suite.peers if p.startswith("kvpress-")]
    if kvpress and not suite.budgets:
        raise source.error(("peers",), f"kvpress peers {kvpress} run at the suite's budgets, but `budgets:` is empty")
    if suite.questions_per_context > 1 and (suite.tasks != ["single"] or suite.questions != "agnostic"):
        raise source.error(("questions_per_context",), "several questions about one compressed context need "
                                                       "`tasks: [single]` and `questions: agnostic`")
    if suite.haystack == "filler" and "prose_qa" in suite.tasks:
        raise source.error(("haystack",), "prose_qa asks about sentences of real prose; use haystack: prose")


def with_overrides(suite: SuiteSpec, overrides: dict) -> SuiteSpec:
    """The suite with command-line values in place of its own, validated like the file (``--contexts 100`` is
    refused as ``contexts: [100]`` would be)."""
    try:
        return SuiteSpec.model_validate(suite.model_dump(exclude_none=True) | overrides)
    except ValidationError as err:
        e = err.errors()[0]
        raise SpecError(f"--{e['loc'][0]}: {e['msg'].removeprefix('Value error, ')}", "command line") from None
