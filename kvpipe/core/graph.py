"""The stage graph: a networkx DAG of stage instances, checked before any model is touched."""
from __future__ import annotations

import networkx as nx
from pydantic import ValidationError

from kvpipe.core.registry import Stage, get_stage
from kvpipe.core.spec import PipelineSpec, did_you_mean, first_error
from kvpipe.core.yaml_source import YamlSource
from kvpipe.errors import KVPipeError


def build_graph(spec: PipelineSpec, source: YamlSource) -> nx.DiGraph:
    """Nodes are stage ids with attribute ``stage`` (the instance) and ``index`` (position in the YAML)."""
    graph = nx.DiGraph()
    for i, entry in enumerate(spec.stages):
        try:
            cls = get_stage(entry.stage)
        except KeyError as err:
            raise source.error(("stages", i, "stage"), err.args[0]) from None
        try:
            params = cls.Params.model_validate(entry.params)
        except ValidationError as err:
            raise first_error(err, source, ("stages", i, "params"), cls.Params) from None
        if entry.node_id in graph:
            raise source.error(("stages", i), f"duplicate stage id {entry.node_id!r}; give one of them an `id:`")
        try:        # a stage may read a file its params name (gates): a bad one is this entry's mistake
            stage = cls(params, entry.node_id)
        except KVPipeError as err:
            raise source.error(("stages", i, "params"), str(err)) from None
        graph.add_node(entry.node_id, stage=stage, index=i)

    ids = list(graph)
    for i, entry in enumerate(spec.stages):
        parents = entry.after if entry.after is not None else ids[i - 1:i]
        for j, parent in enumerate(parents):
            if parent not in graph:
                raise source.error(("stages", i, "after", j),
                                   f"no stage with id {parent!r}{did_you_mean(parent, ids)} (ids: {', '.join(ids)})")
            graph.add_edge(parent, entry.node_id)

    if not nx.is_directed_acyclic_graph(graph):
        cycle = [edge[0] for edge in nx.find_cycle(graph)]
        first = min(graph.nodes[n]["index"] for n in cycle)
        raise source.error(("stages", first, "after"), f"stages form a cycle: {' -> '.join(cycle + cycle[:1])}")
    _wire_slots(graph, spec, source)
    return graph


def execution_order(graph: nx.DiGraph) -> list[Stage]:
    """Topological order; ties broken by YAML order so runs are deterministic."""
    order = nx.lexicographical_topological_sort(graph, key=lambda n: graph.nodes[n]["index"])
    return [graph.nodes[n]["stage"] for n in order]


def _wire_slots(graph: nx.DiGraph, spec: PipelineSpec, source: YamlSource) -> None:
    """Set ``stage.sources`` for every read, checking it: every read needs a writer upstream; a stage reads
    from its *nearest* upstream writers (those no other upstream writer overrides), exactly one unless the
    stage merges that slot."""
    for node in graph:
        stage: Stage = graph.nodes[node]["stage"]
        where = ("stages", graph.nodes[node]["index"], "stage")
        upstream = nx.ancestors(graph, node)
        for slot in stage.reads + stage.optional_reads:
            writers = [n for n in upstream if slot in graph.nodes[n]["stage"].writes]
            nearest = sorted((w for w in writers if not any(o != w and nx.has_path(graph, w, o) for o in writers)),
                             key=lambda n: graph.nodes[n]["index"])
            if not nearest and slot in stage.reads:
                makers = _writers_of(slot)
                raise source.error(where, f"stage {node!r} reads `{slot}` but no stage before it writes it "
                                          f"(stages that write `{slot}`: {makers})")
            if len(nearest) > 1 and slot not in stage.merges:
                raise source.error(where, f"stage {node!r} reads `{slot}` from both {nearest[0]!r} and "
                                          f"{nearest[1]!r}, which are not ordered; chain them or add a `combine` stage")
            stage.sources[slot] = nearest
        needs_budget = {"allocation"} & set(stage.writes)
        if needs_budget and spec.budget is None:
            raise source.error(where, f"stage {node!r} allocates a budget but the spec has no `budget:`; "
                                      "add e.g. `budget: {keep: 0.5}`")


def _writers_of(slot: str) -> str:
    from kvpipe.core.registry import all_stages

    names = [name for name, cls in all_stages().items() if slot in cls.writes]
    return ", ".join(names) or "none registered"


def describe(graph: nx.DiGraph) -> str:
    """Text drawing of the DAG: one line per stage with its parents and slots."""
    lines = []
    for stage in execution_order(graph):
        parents = sorted(graph.predecessors(stage.id), key=lambda n: graph.nodes[n]["index"])
        reads = ", ".join(stage.reads + tuple(f"{s}?" for s in stage.optional_reads)) or "-"
        after = f"  (after {', '.join(parents)})" if parents else ""
        writes = ", ".join(stage.writes) or "-"
        lines.append(f"{stage.id:<16} [{stage.family}]  reads: {reads}  writes: {writes}{after}")
    return "\n".join(lines)
