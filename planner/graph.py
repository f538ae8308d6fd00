"""The model as a networkx layer graph: execution order, where a pipeline may cut, and what each cut sends."""

from __future__ import annotations

import networkx as nx

from planner.budget import Budget
from planner.errors import AutoparError
from planner.model_profile import INPUT_NODE, OUTPUT_NODE, ModelProfile


class GraphError(AutoparError):
    """A profile whose layer graph cannot be pipelined as listed."""


# Edges handled between two looks at the budget: cheap to check, yet a fraction of a second apart on any profile.
_CHECK_EVERY = 256


def build_layer_graph(profile: ModelProfile, budget: Budget | None = None) -> nx.DiGraph:
    """Directed graph: one node per layer (attribute `index`) plus '<input>'/'<output>', edges carry `bytes`.

    With a `budget`, stops (PlanTimeout / PlanCancelled) once it is spent or cancelled.
    """
    g = nx.DiGraph()
    g.add_node(INPUT_NODE, index=-1)
    for layer in profile.layers:
        g.add_node(layer.name, index=layer.index)
    g.add_node(OUTPUT_NODE, index=profile.num_layers)
    for n, e in enumerate(profile.edges):
        if budget is not None and n % _CHECK_EVERY == 0:
            budget.check("building the layer graph")
        prev = g.get_edge_data(e.src, e.dst)
        g.add_edge(e.src, e.dst, bytes=e.bytes + (prev["bytes"] if prev else 0.0))
    if not profile.edges:  # a profile without a dataflow graph: assume a chain
        chain = [INPUT_NODE, *(layer.name for layer in profile.layers), OUTPUT_NODE]
        for i, (a, b) in enumerate(zip(chain, chain[1:])):
            nbytes = profile.layers[i - 1].output_bytes if i > 0 else profile.layers[0].input_bytes
            g.add_edge(a, b, bytes=nbytes)
    return g


def layer_order(graph: nx.DiGraph) -> list[str]:
    """Layers in execution order; raises when an edge runs backwards or the graph has a cycle."""
    if not nx.is_directed_acyclic_graph(graph):
        raise GraphError("the profile's layer graph has a cycle; a pipeline needs a feed-forward chain of layers")
    for u, v in graph.edges:
        if graph.nodes[u]["index"] >= graph.nodes[v]["index"]:
            raise GraphError(f"edge {u} -> {v} runs against the layer order; re-profile the model")
    return [n for n in sorted(graph.nodes, key=lambda n: graph.nodes[n]["index"]) if n not in (INPUT_NODE, OUTPUT_NODE)]


def legal_cuts(profile: ModelProfile) -> list[int]:
    """Layer indices k at which a pipeline stage may start: the profile's `cut_points`, the profiler's one definition
    (`profiler.partition`: exactly one tensor crosses and the stages compose to the model's forward)."""
    return sorted({k for k in profile.cut_points if 0 < k < profile.num_layers})


def cut_bytes(profile: ModelProfile, graph: nx.DiGraph | None = None, budget: Budget | None = None) -> list[float]:
    """Per-sample bytes that cross a cut before layer k, for k = 0..num_layers (0 and num_layers send nothing).

    With a `budget`, stops (PlanTimeout / PlanCancelled) once it is spent or cancelled.
    """
    g = graph if graph is not None else build_layer_graph(profile, budget)
    index = {n: g.nodes[n]["index"] for n in g.nodes}
    out = [0.0] * (profile.num_layers + 1)
    for n, (u, v, data) in enumerate(g.edges(data=True)):
        if budget is not None and n % _CHECK_EVERY == 0:
            budget.check("summing the bytes each pipeline cut sends")
        if u == INPUT_NODE:
            continue
        for k in range(index[u] + 1, min(index[v], profile.num_layers - 1) + 1):
            out[k] += data["bytes"]
    for k in range(1, profile.num_layers):
        if out[k] == 0.0:
            out[k] = profile.layers[k - 1].output_bytes
    return out
