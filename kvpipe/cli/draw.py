"""Draw a pipeline's stage DAG to a PNG with matplotlib (optional extra ``plot``)."""
from __future__ import annotations

import networkx as nx

from kvpipe.core.plotting import pyplot


def draw_graph(pipeline, path: str) -> None:
    plt = pyplot("drawing a graph")
    graph = pipeline.graph
    # Layered left-to-right layout: a node's layer is its longest distance from a source.
    for node in nx.topological_sort(graph):
        graph.nodes[node]["layer"] = max((graph.nodes[p]["layer"] + 1 for p in graph.predecessors(node)), default=0)
    pos = nx.multipartite_layout(graph, subset_key="layer")
    labels = {}
    for node in graph:
        stage = graph.nodes[node]["stage"]
        labels[node] = f"{node}\n[{stage.family}]\nwrites: {', '.join(stage.writes) or '-'}"
    width = max(nx.get_node_attributes(graph, "layer").values(), default=0) + 1
    fig, ax = plt.subplots(figsize=(2.8 * width, 3.5))
    nx.draw_networkx_edges(graph, pos, ax=ax, arrows=True, arrowsize=16, node_size=6000)
    nx.draw_networkx_labels(graph, pos, labels, ax=ax, font_size=8,
                            bbox={"boxstyle": "round,pad=0.5", "fc": "#cfe2f3", "ec": "#5b7fa6"})
    ax.set_title(f"{pipeline.spec.name or pipeline.source}  (budget {pipeline.spec.budget})")
    ax.margins(x=0.08, y=0.3)  # room for the label boxes, which networkx does not measure
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
