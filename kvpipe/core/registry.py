"""The stage registry: ``@register("name", family=...)`` on a ``Stage`` subclass makes it usable in YAML.

A stage declares the slot kinds it reads and writes; ``build()`` checks every read has a writer upstream.

| slot         | per layer, what it holds                                                   |
|--------------|-----------------------------------------------------------------------------|
| `candidates` | ``Candidates``: ``protected`` (always kept) and ``eligible`` (may be kept) masks |
| `scores`     | ``float [B, H_kv, n]``: higher = more worth keeping                          |
| `allocation` | ``long [B, H_kv]``: how many slots each (row, KV head) keeps                 |
| `keep`       | ``bool [B, H_kv, n]``: the kept set; the cache compacts to it physically      |
| `values`     | ``float [B, H_kv, n, D]``: replacement values the cache stores for kept slots |
| `store`      | ``Quantization``: how the kept slots are stored (one `quantize` stage at most) |
"""
from __future__ import annotations

import importlib
import pkgutil
from types import UnionType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict

from kvpipe.core.spec import did_you_mean

if TYPE_CHECKING:
    import torch

    from kvpipe.core.context import CompressionContext, Observation

SLOT_KINDS = ("candidates", "scores", "allocation", "keep", "values")
FAMILIES = ("candidate selection", "quantization", "scoring", "budget allocation", "eviction", "evidence recovery")


class Params(BaseModel):
    """Base of every stage's parameter model: strict, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


StageParams = Params                        # the name a stage's ``Params`` attribute would otherwise hide
P = TypeVar("P", bound=Params)


class Stage(Generic[P]):
    """One node of a pipeline, generic in its parameter model: ``class TopK(EvictionStage[TopKParams])`` types
    ``self.params``.

    Subclasses set ``Params`` (a ``Params`` model, the one they are generic in), ``reads`` / ``writes`` (slot
    kinds) and implement ``__call__(ctx)``, which runs once per compression after the forward pass. Stages that
    need the queries (``observes = True``) also implement ``observe(obs)``, called inside each layer's attention
    during the compressing forward; what it returns is handed back as ``ctx.observed(self)[layer]``.
    """

    name: ClassVar[str]
    family: ClassVar[str]
    Params: ClassVar[type[StageParams]] = StageParams
    reads: ClassVar[tuple[str, ...]] = ()
    optional_reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    merges: ClassVar[tuple[str, ...]] = ()  # read slots that may come from several unordered writers
    observes: ClassVar[bool] = False
    probes: ClassVar[bool] = False          # observes a probe forward instead (``stage_bases.ProbingScorer``)

    def __init__(self, params: P, node_id: str | None = None):
        self.params: P = params
        self.id = node_id or self.name
        self.sources: dict[str, list[str]] = {}  # slot -> ids of the nearest upstream writers (set by build)

    def observe(self, obs: Observation) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, ctx: CompressionContext) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def check_budget(self, budget) -> str | None:
        """A reason why ``budget`` can never be met by this stage, or None. Checked at build time."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"


_REGISTRY: dict[str, type[Stage]] = {}


def register(name: str, family: str):
    """Class decorator adding a stage to the registry under ``name``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown stage family {family!r}; one of {FAMILIES}")

    def deco(cls: type[Stage]) -> type[Stage]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"stage {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        bad = set(cls.reads + cls.optional_reads + cls.writes) - set(SLOT_KINDS)
        if bad:
            raise ValueError(f"stage {name!r} names unknown slot kinds {sorted(bad)}; known: {SLOT_KINDS}")
        cls.name, cls.family = name, family
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    """Import every module of ``kvpipe.stages``: a stage is one file there with its ``@register`` line."""
    stages = importlib.import_module("kvpipe.stages")
    for module in pkgutil.iter_modules(stages.__path__, "kvpipe.stages."):
        importlib.import_module(module.name)


def get_stage(name: str) -> type[Stage]:
    """The stage class registered as ``name``; ``KeyError`` with a did-you-mean otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown stage {name!r}{did_you_mean(name, _REGISTRY)} (see `kvpipe stages`)")
    return _REGISTRY[name]


def all_stages() -> dict[str, type[Stage]]:
    _load_builtin()
    return dict(sorted(_REGISTRY.items()))


def describe_params(cls: type[Stage]) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, description)`` per parameter, read from the pydantic model."""
    return describe_fields(cls.Params)


def describe_fields(model) -> list[tuple[str, str, Any, str]]:
    """``(name, type, default, description)`` per field of a pydantic model (``"required"`` when it has none)."""
    rows = []
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else (
            field.default_factory() if field.default_factory is not None else field.default)
        if isinstance(default, BaseModel):
            default = default.model_dump(exclude_none=True)
        rows.append((name, _type_name(field.annotation), default, field.description or ""))
    return rows


def _type_name(annotation) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if origin in (Union, UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, dict, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]" if args else origin.__name__
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
