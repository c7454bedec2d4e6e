"""Draw a pipeline's stage DAG to a PNG with matplotlib (optional extra ``plot``)."""
from __future__ import annotations

import networkx as nx

from kvpipe.errors import KVPipeError


def draw_graph(pipeline, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KVPipeError("drawing needs matplotlib: pip install 'kvpipe[plot]'") from None
    graph = pipeline.graph
    # Layered left-to-right layout: a node's layer is its longest distance from a source.
    for node in nx.topological_sort(graph):
        graph.nodes[node]["layer"] = max((graph.nodes[p]["layer"] + 1 for p in graph.predecessors(node)), default=0)
    pos = nx.multipartite_layout(graph, subset_key="layer")
    labels = {n: f"{n}\n[{graph.nodes[n]['stage'].family}]" for n in graph}
    fig, ax = plt.subplots(figsize=(2.6 * (max(nx.get_node_attributes(graph, 'layer').values(), default=0) + 1), 3))
    nx.draw_networkx(graph, pos, ax=ax, labels=labels, node_color="#cfe2f3", node_size=2600, node_shape="s",
                     font_size=8, arrows=True, arrowsize=16)
    ax.set_title(f"{pipeline.spec.name or pipeline.source}  (budget {pipeline.spec.budget})")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
