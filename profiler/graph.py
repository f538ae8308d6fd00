"""The layer graph: which layer's output feeds which layer, with the bytes per sample on each edge.

Built from a torch.fx trace in which the layers are leaf modules, so edges follow real dataflow (a skip connection
across layers shows up as an edge that jumps over them). When the model cannot be traced, forward hooks recover the
edges from tensor identity instead, assuming a tensor of unknown origin comes from the previous layer; a warning says
why tracing failed.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import networkx as nx
from torch import fx, nn

from planner.model_profile import INPUT_NODE, OUTPUT_NODE, LayerEdge, ModelProfile
from profiler.partition import LayerTracer
from profiler.recording import LayerCall, tensor_bytes, tensors_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerGraph:
    """Edges between layers (what each layer reads from which) and how they were found ('fx' or 'hooks').

    Where a pipeline may cut is decided by `profiler.partition`, not by these edges: they only size the traffic.
    """

    edges: list[LayerEdge]
    method: str


def build_layer_graph(
    model: nn.Module, layer_names: list[str], records: dict[str, LayerCall], inputs: tuple, batch: int,
    traced: fx.Graph | None = None,
) -> LayerGraph:
    """The layer graph from an fx trace ('fx'), or from forward hooks when tracing fails ('hooks').

    `traced`: the model's graph already traced with its layers as leaves (`profiler.partition`), reused as is.
    """
    if layer_names == [""]:
        out = tensor_bytes(records[""].output) / batch
        inp = tensor_bytes(inputs) / batch
        edges = [LayerEdge(src=INPUT_NODE, dst="", bytes=inp), LayerEdge(src="", dst=OUTPUT_NODE, bytes=out)]
        return LayerGraph(edges, "single")
    try:
        graph = traced if traced is not None else LayerTracer(set(layer_names)).trace(model)
        return LayerGraph(_edges_from_fx(graph, layer_names, records, inputs, batch), "fx")
    except Exception as exc:  # noqa: BLE001 - fx raises many types; every one means "use the fallback"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.warning(
            "torch.fx could not trace %s (%s: %s); building the layer graph from forward hooks instead, which "
            "assumes a tensor of unknown origin comes from the previous layer", type(model).__name__,
            type(exc).__name__, reason,
        )
        return LayerGraph(_edges_from_hooks(layer_names, records, inputs, batch), "hooks")


def _edges_from_fx(
    graph: fx.Graph, layer_names: list[str], records: dict[str, LayerCall], inputs: tuple, batch: int
) -> list[LayerEdge]:
    layer_set = set(layer_names)
    seen = [n.target for n in graph.nodes if n.op == "call_module" and n.target in layer_set]
    if sorted(seen) != sorted(layer_names):
        missing = sorted(layer_set - set(seen)) or sorted({s for s in seen if seen.count(s) > 1})
        raise ValueError(f"the trace does not call each layer exactly once ({missing[:3]})")
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # node -> {producer node: (layer name or <input>, bytes per sample)}
    producers: dict[fx.Node, dict[fx.Node, tuple[str, float]]] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            i = placeholders.index(node)
            # An input a later pipeline stage reads, sent on by the stage of layer `relayed_by` (profiler.hf_encdec).
            src = node.meta.get("relayed_by", INPUT_NODE)
            producers[node] = {node: (src, tensor_bytes(inputs[i]) / batch)} if i < len(inputs) else {}
        elif node.op == "call_module" and node.target in layer_set:
            producers[node] = {node: (node.target, tensor_bytes(records[node.target].output) / batch)}
        elif (
            node.op == "call_function" and node.target is operator.getitem
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_module"
            and node.args[0].target in layer_set
        ):
            src = node.args[0].target
            try:
                part = records[src].output[node.args[1]]
            except (TypeError, IndexError, KeyError):
                part = records[src].output
            producers[node] = {node: (src, tensor_bytes(part) / batch)}
        else:
            merged: dict[fx.Node, tuple[str, float]] = {}
            for arg in node.all_input_nodes:
                merged.update(producers.get(arg, {}))
            producers[node] = merged
    totals: dict[tuple[str, str], float] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in layer_set:
            dst = node.target
        elif node.op == "output":
            dst = OUTPUT_NODE
        else:
            continue
        incoming: dict[fx.Node, tuple[str, float]] = {}
        for arg in node.all_input_nodes:
            incoming.update(producers.get(arg, {}))
        for src, nbytes in incoming.values():
            totals[(src, dst)] = totals.get((src, dst), 0.0) + nbytes
    return [LayerEdge(src=s, dst=d, bytes=b) for (s, d), b in totals.items()]


def _edges_from_hooks(
    layer_names: list[str], records: dict[str, LayerCall], inputs: tuple, batch: int
) -> list[LayerEdge]:
    origin: dict[int, tuple[str, float]] = {id(t): (INPUT_NODE, tensor_bytes(t) / batch) for t in tensors_of(inputs)}
    totals: dict[tuple[str, str], float] = {}

    def connect(dst: str, values: object, previous: str) -> None:
        for t in tensors_of(values):
            src, nbytes = origin.get(id(t), (previous, tensor_bytes(t) / batch))
            totals[(src, dst)] = totals.get((src, dst), 0.0) + nbytes

    previous = INPUT_NODE
    for name in layer_names:
        call = records[name]
        connect(name, (call.args, call.kwargs), previous)
        for t in tensors_of(call.output):
            origin[id(t)] = (name, tensor_bytes(t) / batch)
        previous = name
    connect(OUTPUT_NODE, records[OUTPUT_NODE].output, previous)
    return [LayerEdge(src=s, dst=d, bytes=b) for (s, d), b in totals.items()]


def layer_graph(profile: ModelProfile) -> nx.DiGraph:
    """The profile's layer graph as a networkx DiGraph: nodes carry the LayerProfile, edges carry `bytes`."""
    g = nx.DiGraph()
    g.add_node(INPUT_NODE)
    for layer in profile.layers:
        g.add_node(layer.name, layer=layer)
    g.add_node(OUTPUT_NODE)
    for e in profile.edges:
        g.add_edge(e.src, e.dst, bytes=e.bytes)
    return g

