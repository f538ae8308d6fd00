"""The one definition of a legal pipeline cut, and the stage programs that realise it.

A pipeline stage must compute exactly what the model's own `forward` computes for its part: the glue between layers
(an add, a `relu`, a `flatten`, `wte(ids) + wpe(pos)`) travels with the stage that runs it. So the model is traced
with torch.fx, its layers kept as opaque calls, and the traced graph (not the list of layers) is what gets cut:

- a cut before layer k is a position in the graph between layer k-1's call and layer k's call; everything before
  it runs on the earlier stage, everything after on the later one;
- it is legal only when exactly one value crosses it and that value is a floating-point tensor (a pipeline stage
  sends one activation and receives its gradient), no model input is read after it (only the first stage sees the
  batch), and no parameter is used on both sides of it outside a layer;
- the stage programs are the graph's pieces, so running them one after another is running the model's forward.

The profiler records the legal cuts in `ModelProfile.cut_points`, the planner only ever cuts there, and the executor
builds its stages with `Partition.stage_modules`, refusing a plan whose cuts the same `Partition` does not allow.

A model torch.fx cannot trace (data-dependent control flow, `**kwargs` forwarding) gets no cuts at all:
`Partition.trace_error` says why, and it trains with pp=1. Hugging Face transformers models, which fx cannot trace,
are cut between their blocks by `profiler.hf_partition` instead (same interface, stage programs proved on a small copy).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

logger = logging.getLogger(__name__)

#: Name of the placeholder through which a later stage receives the previous stage's activation.
STAGE_INPUT = "stage_input"


class PartitionError(ValueError):
    """A requested cut is not legal for this model (the message names the cut and why)."""


class LayerTracer(fx.Tracer):
    """Traces the model with every layer as one opaque call."""

    def __init__(self, layer_names: set[str]) -> None:
        super().__init__()
        self.layer_names = layer_names

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.layer_names or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class _Cut:
    """Where a legal cut before layer k sits in the graph and what crosses it."""

    position: int  # index in the node list of the first node of the later stage
    value: fx.Node  # the one value the earlier stage sends
    nbytes: int  # bytes of that value at the traced batch size


@dataclass
class Partition:
    """A model's forward traced at layer granularity, with its legal cuts (see the module docstring)."""

    layer_names: list[str]
    graph: fx.Graph | None = None
    #: Names of the forward parameters the batch provides as tensors, in the forward's order.
    inputs: list[str] = field(default_factory=list)
    #: Forward parameters not provided (or not tensors), fixed at the values of the traced call.
    constants: dict[str, Any] = field(default_factory=dict)
    cuts: dict[int, _Cut] = field(default_factory=dict)
    #: k -> why no cut before layer k is legal.
    reasons: dict[int, str] = field(default_factory=dict)
    #: Why the model could not be traced (then no cut is legal).
    trace_error: str | None = None

    @property
    def legal_cuts(self) -> list[int]:
        """Layer indices k at which a stage may start (1 <= k < number of layers)."""
        return sorted(self.cuts)

    def why_illegal(self, k: int) -> str:
        """Why a stage cannot start at layer k (empty when it can)."""
        if k in self.cuts:
            return ""
        if self.trace_error is not None:
            return f"torch.fx could not trace the model ({self.trace_error}), so no pipeline cut can be proven safe"
        if not 0 < k < len(self.layer_names):
            return f"layer index {k} is not between 1 and {len(self.layer_names) - 1}"
        return self.reasons.get(k, "not a legal cut")

    def check(self, bounds: Sequence[int]) -> None:
        """Raise PartitionError naming the first stage start in `bounds` (inner boundaries) that is not legal."""
        for k in bounds:
            if k not in self.cuts:
                name = self.layer_names[k] if 0 <= k < len(self.layer_names) else str(k)
                raise PartitionError(
                    f"a pipeline stage cannot start at layer {k} ('{name}'): {self.why_illegal(k)}; plan with cuts "
                    f"from the profile's cut_points ({self.legal_cuts or 'none: run with pp=1'})"
                )

    def stage_modules(self, model: nn.Module, bounds: Sequence[int], stages: Sequence[int] | None = None,
                      *, copy_model: bool = True) -> list[fx.GraphModule]:
        """The programs of the stages between `bounds` (inner stage starts), optionally only those in `stages`.

        Stage 0 takes the batch's tensors (positionally, then by name); every later stage takes the previous stage's
        activation; the last returns the model's output. Parameter and buffer names are the model's own. With
        `copy_model` each stage is built from its own deep copy of `model` (a parameter shared by two stages becomes
        one copy per stage, see `executor.shared`); without it the stages share `model`'s modules.
        """
        if self.graph is None:
            raise PartitionError(self.why_illegal(1))
        self.check(bounds)
        starts = [self.cuts[k] for k in bounds]
        nodes = list(self.graph.nodes)
        edges = [0, *(c.position for c in starts), len(nodes)]
        wanted = range(len(edges) - 1) if stages is None else stages
        out = []
        for s in wanted:
            root = copy.deepcopy(model) if copy_model else model
            graph = self._stage_graph(nodes, edges[s], edges[s + 1], first=s == 0,
                                      incoming=starts[s - 1].value if s > 0 else None,
                                      outgoing=starts[s].value if s < len(starts) else None)
            gm = fx.GraphModule(root, graph, class_name=f"Stage{s}")
            out.append(gm)
        return out

    def _stage_graph(self, nodes: list[fx.Node], lo: int, hi: int, *, first: bool, incoming: fx.Node | None,
                     outgoing: fx.Node | None) -> fx.Graph:
        graph = fx.Graph()
        env: dict[fx.Node, Any] = {}
        if incoming is not None:
            env[incoming] = graph.placeholder(STAGE_INPUT)

        def lookup(n: fx.Node) -> Any:
            if n not in env:
                if n.op != "get_attr":
                    raise AssertionError(f"stage graph is missing {n.name}")  # the cut analysis rules this out
                env[n] = graph.node_copy(n, lookup)
            return env[n]

        for i, node in enumerate(nodes):
            if node.op == "placeholder":
                if node.target not in self.inputs:
                    env[node] = _placeholder_default(node)  # a fixed argument, baked into every stage
                elif first:
                    env[node] = graph.placeholder(node.target)
            elif node.op == "output":
                continue
            elif lo <= i < hi and node.op != "get_attr":
                env[node] = graph.node_copy(node, lookup)
        if outgoing is not None:
            graph.output(lookup(outgoing))
        else:
            graph.output(fx.node.map_arg(nodes[-1].args[0], lookup))
        # No dead-code elimination: an in-place op in the glue has no users but must still run.
        graph.lint()
        return graph


def _placeholder_default(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


def positional_inputs(model: nn.Module, example_inputs: Any) -> tuple:
    """The model's inputs as one positional tuple: a dict batch (`model(**batch)`) is bound to `forward`'s
    parameters in order, with the defaults of the parameters it skips; a tuple stays; anything else is one input."""
    if isinstance(example_inputs, tuple):
        return example_inputs
    if not isinstance(example_inputs, Mapping):
        return (example_inputs,)
    sig = inspect.signature(model.forward)
    params = list(sig.parameters.values())
    unknown = [k for k in example_inputs if k not in sig.parameters]
    if unknown and not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
        raise TypeError(f"{type(model).__name__}.forward has no parameter '{unknown[0]}' (the batch's keys are "
                        f"{', '.join(example_inputs)})")
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keyword_only = [k for k in example_inputs
                    if k in sig.parameters and sig.parameters[k].kind == inspect.Parameter.KEYWORD_ONLY]
    if unknown or keyword_only:
        raise TypeError(f"the batch's key '{(unknown or keyword_only)[0]}' cannot be passed positionally to "
                        f"{type(model).__name__}.forward")
    last = max(i for i, p in enumerate(positional) if p.name in example_inputs)
    return tuple(example_inputs.get(p.name, p.default) for p in positional[:last + 1])


def _bind(model: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Split the forward's parameters into the batch's tensors (traced) and everything else (fixed)."""
    sig = inspect.signature(model.forward)
    kinds = {p.kind for p in sig.parameters.values()}
    if inspect.Parameter.VAR_POSITIONAL in kinds or inspect.Parameter.VAR_KEYWORD in kinds:
        raise TypeError("the forward takes *args / **kwargs, which torch.fx cannot trace as fixed inputs")
    bound = sig.bind(*args, **kwargs)
    inputs, constants = [], {}
    for name, param in sig.parameters.items():
        if name in bound.arguments and isinstance(bound.arguments[name], torch.Tensor):
            inputs.append(name)
        else:
            constants[name] = bound.arguments.get(name, param.default)
    return inputs, constants


def partition(model: nn.Module, layer_names: Sequence[str], args: Sequence[Any] = (),
              kwargs: Mapping[str, Any] | None = None) -> Partition:
    """Trace `model` called as `model(*args, **kwargs)` and find its legal cuts (see the module docstring).

    Run it on a meta copy with meta inputs: the graph is executed once to learn each value's type and size.
    """
    from profiler.hf import is_hf_model

    if is_hf_model(model):
        from profiler.hf_partition import partition_hf

        return partition_hf(model, layer_names, args, kwargs)
    kwargs = dict(kwargs or {})
    names = list(layer_names)
    result = Partition(layer_names=names)
    if len(names) < 2:
        return result
    try:
        result.inputs, result.constants = _bind(model, args, kwargs)
        gm = fx.GraphModule(model, LayerTracer(set(names)).trace(model, concrete_args=result.constants))
        values = _run(gm, result, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - fx and the model raise many types; every one means "no cuts"
        text = str(exc).strip()
        result.trace_error = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
        logger.info("no pipeline cuts for %s: %s", type(model).__name__, result.trace_error)
        return result
    result.graph = gm.graph
    _find_cuts(result, model, list(gm.graph.nodes), values)
    return result


def _run(gm: fx.GraphModule, part: Partition, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[fx.Node, Any]:
    """Execute the graph once, keeping every node's value (on meta this allocates nothing)."""
    given = dict(zip(part.inputs, [a for a in args if isinstance(a, torch.Tensor)])) | {
        k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)
    }
    placeholders = [given.get(n.target, _placeholder_default(n)) for n in gm.graph.nodes if n.op == "placeholder"]
    values: dict[fx.Node, Any] = {}

    class _Keep(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            values[n] = out = super().run_node(n)
            return out

    with torch.no_grad():
        _Keep(gm).run(*placeholders)
    return values


def _find_cuts(part: Partition, model: nn.Module, nodes: list[fx.Node], values: dict[fx.Node, Any]) -> None:
    names = part.layer_names
    layer_set = set(names)
    calls: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.op == "call_module" and n.target in layer_set:
            calls.setdefault(n.target, []).append(i)
    bad = [n for n in names if len(calls.get(n, [])) != 1]
    if bad:
        reason = f"layer '{bad[0]}' is called {len(calls.get(bad[0], []))} times in the traced forward, not once"
        part.reasons = {k: reason for k in range(1, len(names))}
        return
    at = [calls[n][0] for n in names]
    params = {id(p) for p in model.parameters()}
    # Parameters each node touches: `glue` for a get_attr or a call of a module that is not a layer, `layer` for a
    # layer call. A glue parameter may not be used on both sides of a cut (each stage would train its own copy).
    glue: dict[fx.Node, set[int]] = {}
    layer: dict[fx.Node, set[int]] = {}
    for n in nodes:
        if n.op == "get_attr" and id(values.get(n)) in params:
            glue[n] = {id(values[n])}
        elif n.op == "call_module":
            owned = {id(p) for p in model.get_submodule(n.target).parameters()}
            (layer if n.target in layer_set else glue)[n] = owned
    touches = (glue, layer)
    index = {n: i for i, n in enumerate(nodes)}
    users = {n: [index[u] for u in n.users] for n in nodes}
    for k in range(1, len(names)):
        lo, hi = max(at[:k]), min(at[k:])
        if lo >= hi:
            part.reasons[k] = f"layer '{names[k]}' runs before layer '{names[at.index(lo)]}' in the forward"
            continue
        best: _Cut | None = None
        why = ""
        for p in range(lo + 1, hi + 1):
            cut, why_p = _cut_at(p, nodes, index, users, values, touches, part)
            if cut is not None and (best is None or cut.nbytes <= best.nbytes):
                best = cut
            why = why or why_p
        if best is not None:
            part.cuts[k] = best
        else:
            part.reasons[k] = why


def _sides(p: int, index: dict, users: dict, table: dict[fx.Node, set[int]]) -> tuple[set[int], set[int]]:
    """Parameters a family of nodes touches before and after position p (a get_attr counts where it is used)."""
    before: set[int] = set()
    after: set[int] = set()
    for n, ids in table.items():
        where = users[n] if n.op == "get_attr" else [index[n]]
        if any(u < p for u in where):
            before |= ids
        if any(u >= p for u in where):
            after |= ids
    return before, after


def _cut_at(p, nodes, index, users, values, touches, part) -> tuple[_Cut | None, str]:
    glue_before, glue_after = _sides(p, index, users, touches[0])
    layer_before, layer_after = _sides(p, index, users, touches[1])
    if glue_before & (glue_after | layer_after) or glue_after & layer_before:
        return None, ("a parameter the model's own forward uses outside its layers (e.g. a weight tied to the output "
                      "projection, or a parameter of the root module) would be needed on both sides of it")
    crossing = []
    for n in nodes[:p]:
        later = [u for u in users[n] if u >= p]
        if not later:
            continue
        if n.op == "get_attr":
            continue
        if n.op == "placeholder":
            if n.target in part.inputs:
                return None, (f"the model input '{n.target}' is read after it, and only the first pipeline stage "
                              "receives the batch")
            continue  # a fixed argument: its value is baked into the stage
        crossing.append(n)
    if len(crossing) != 1:
        what = ", ".join(f"'{n.name}'" for n in crossing[:4])
        return None, f"{len(crossing)} values cross it ({what}); a pipeline stage passes exactly one tensor"
    value = values.get(crossing[0])
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = type(value).__name__ if not isinstance(value, torch.Tensor) else f"{value.dtype} tensor"
        return None, f"the value crossing it ('{crossing[0].name}') is a {kind}, not a floating-point tensor"
    return _Cut(position=p, value=crossing[0], nbytes=value.numel() * value.element_size()), ""
