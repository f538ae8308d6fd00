"""Whether a tensor-parallel layer can also run sequence-parallel, and what it then shards along the sequence.

Sequence parallelism (Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models", 2022;
Megatron `--sequence-parallel`; torchtitan's `SequenceParallel` plan) runs everything of a layer outside its TP
regions on the tokens of one sequence shard (dim 1), so that the norms' and residual adds' activations are split
over the TP group too. That is the same computation only when everything outside the regions acts on each token on
its own. On the layer's traced graph (`profiler.tensor_parallel.trace_layer`, module paths in `nn_module_stack`):

- each TP group lives in one submodule of the layer (its *region*, e.g. `attn`, `mlp`), called once, with one
  tensor input that only its colwise Linears (and shape reads) use, and one output reached from its rowwise Linears
  through per-token ops only: the region's input is then gathered whole and its rowwise outputs reduce-scattered
  back to sequence shards;
- outside the regions only per-token ops run: norm modules, dropout and activation modules, elementwise ops, and
  reductions over the last (feature) dim; no shape is read and nothing is reshaped (a `view(b, t, ...)` would see
  the local token count). Parameters outside the regions belong to norm modules (they become replicated
  DTensors whose gradients are summed over the group);
- the layer's forward needs no shape rewrite for TP (`profiler.tp_shapes` makes no edit): the executor's rewritten
  forward would call the regions' Linears directly, past the hooks that gather a region's input.

Anything else: no sequence parallelism for that layer (it still runs plain tensor parallelism).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import fx, nn

from planner.model_profile import SequenceParallelSpec
from profiler.tp_shapes import ShardError, analyze

logger = logging.getLogger(__name__)

_PER_TOKEN_CALLS = {
    "add", "sub", "mul", "truediv", "div", "neg", "pow", "exp", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "gelu",
    "silu", "dropout", "float", "half", "bfloat16", "to", "type_as", "contiguous", "clone", "add_", "mul_", "iadd",
    "imul", "square", "erf",
}
_LAST_DIM_REDUCTIONS = {"mean", "sum", "amax", "var", "norm"}
_PER_TOKEN_MODULES = (
    nn.Dropout, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.LeakyReLU, nn.Mish, nn.ELU,
    nn.Hardswish, nn.SELU,
)
_NORMS = (nn.LayerNorm, nn.RMSNorm)


class _NotSequenceParallel(Exception):
    """Why a layer cannot run sequence-parallel."""


def _name(node: fx.Node) -> str:
    if node.op in ("call_method", "call_module"):
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _stack(node: fx.Node) -> list[str]:
    return [key.split("@")[0] for key in node.meta.get("nn_module_stack", {})]


def _region_of(node: fx.Node, regions: list[str]) -> str | None:
    for path in _stack(node):
        for region in regions:
            if path == region or path.startswith(region + "."):
                return region
    return None


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def _is_norm(module: nn.Module) -> bool:
    # A hand-written norm (traced through by fx) counts when its name says so; its ops are checked one by one.
    return isinstance(module, _NORMS) or type(module).__name__.lower().endswith("norm")


def _per_token(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules[node.target]
        return _is_norm(module) or isinstance(module, _PER_TOKEN_MODULES)
    name = _name(node)
    if name in _PER_TOKEN_CALLS:
        return True
    if name in _LAST_DIM_REDUCTIONS:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        rank = len(_shape(node.args[0]) or ())
        dims = dim if isinstance(dim, (list, tuple)) else [dim]
        return dim is not None and all(isinstance(d, int) and d % max(rank, 1) == rank - 1 for d in dims)
    return False


def _bytes(node: fx.Node) -> float:
    meta = node.meta["tensor_meta"]
    return float(math.prod(meta.shape) * torch.tensor([], dtype=meta.dtype).element_size())


def _check(gm: fx.GraphModule, layer: nn.Module, colwise: list[str], rowwise: list[str]) -> tuple[list[str], list[str], list[fx.Node]]:
    """(norms, regions, region input nodes), or raise `_NotSequenceParallel`."""
    modules = dict(gm.named_modules())
    regions = sorted({m.rpartition(".")[0] for m in colwise + rowwise})
    if "" in regions:
        raise _NotSequenceParallel("a sharded Linear is called directly by the layer, not inside a region module")
    if any(a != b and b.startswith(a + ".") for a in regions for b in regions):
        raise _NotSequenceParallel("its TP regions nest")
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and _shape(n) is not None]
    if len(inputs) != 1 or len(_shape(inputs[0])) < 3:
        raise _NotSequenceParallel("it does not take one (batch, sequence, ...) tensor")
    tokens = _shape(inputs[0])[:2]
    members: dict[str, list[fx.Node]] = {r: [] for r in regions}
    owner: dict[fx.Node, str | None] = {}
    for node in gm.graph.nodes:
        owner[node] = _region_of(node, regions) if node.op not in ("placeholder", "output") else None
        if owner[node] is not None:
            members[owner[node]].append(node)
            if any(key.split("@")[0] == owner[node] and "@" in key for key in node.meta.get("nn_module_stack", {})):
                raise _NotSequenceParallel(f"region '{owner[node]}' is called more than once")
    region_inputs = []
    for region, nodes in members.items():
        outside = {a for n in nodes for a in n.all_input_nodes if owner[a] != region and _shape(a) is not None}
        if len(outside) != 1:
            raise _NotSequenceParallel(f"region '{region}' takes {len(outside)} tensors, not one")
        x = next(iter(outside))
        for user in x.users:
            if owner.get(user) == region and not (
                    (user.op == "call_module" and user.target in colwise)
                    or _name(user) in ("getattr", "size") or _name(user) == "getitem" and _shape(user) is None):
                raise _NotSequenceParallel(f"region '{region}' uses its input other than in its colwise Linears")
        outputs = [n for n in nodes if any(owner.get(u) != region for u in n.users)]
        if len(outputs) != 1 or (_shape(outputs[0]) or ())[:2] != tokens:
            raise _NotSequenceParallel(f"region '{region}' does not return one tensor of the layer's tokens")
        node = outputs[0]  # walk back to a rowwise Linear through per-token single-input ops
        while not (node.op == "call_module" and node.target in rowwise):
            ins = [a for a in node.all_input_nodes if _shape(a) is not None]
            if len(ins) != 1 or not _per_token(node, modules) or owner.get(ins[0]) != region:
                raise _NotSequenceParallel(f"region '{region}' does not end in a rowwise Linear")
            node = ins[0]
        region_inputs.append(x)
    norms: set[str] = set()
    for node in gm.graph.nodes:
        if owner[node] is not None or node.op in ("placeholder", "output"):
            continue
        stack = _stack(node)
        if node.op == "get_attr":
            path = str(node.target).rpartition(".")[0]
            if not path or not _is_norm(layer.get_submodule(path)) or len(_shape(node) or ()) > 1:
                raise _NotSequenceParallel(f"it uses the tensor '{node.target}' outside a norm")
            norms.add(path)
            continue
        if _shape(node) is None or not _per_token(node, modules):
            raise _NotSequenceParallel(f"'{_name(node)}' outside its TP regions is not a per-token op")
        if (_shape(node) or ())[:2] != tokens:
            raise _NotSequenceParallel(f"'{_name(node)}' outside its TP regions changes the (batch, sequence) dims")
        if node.op == "call_module" and _is_norm(modules[node.target]):
            norms.add(node.target)
        norms.update(p for p in stack if _is_norm(layer.get_submodule(p)))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node) or (_shape(out) or ())[:2] != tokens:
        raise _NotSequenceParallel("its output is not one tensor of its input's tokens")
    return sorted(norms), regions, region_inputs


def detect_sequence_parallel(gm: fx.GraphModule, module: nn.Module, colwise: dict[str, tuple[int, ...] | None],
                             rowwise: list[str], divisor: int, batch: int) -> SequenceParallelSpec | None:
    """The layer's sequence-parallel spec, or None (logged why) when it cannot run so (see the module docstring).

    `gm` is the layer's traced graph with shapes; it may be rewritten in place (the last use of it).
    """
    try:
        norms, regions, region_inputs = _check(gm, module, list(colwise), rowwise)
        held = {name for name, p in module.named_parameters() if p.requires_grad}
        loose = [n for n in held if not any(n.startswith(r + ".") for r in regions + norms)]
        if loose:
            raise _NotSequenceParallel(f"parameter '{loose[0]}' is neither in a TP region nor in a norm")
        if analyze(gm, colwise, set(rowwise), max(divisor, 2)).edits:
            raise _NotSequenceParallel("its forward needs its shapes rewritten for tensor parallelism")
    except (_NotSequenceParallel, ShardError) as exc:
        logger.info("no sequence parallelism for %s: %s", type(module).__name__, exc)
        return None
    return SequenceParallelSpec(norms=norms, regions=regions,
                                gathered_bytes=sum(_bytes(x) for x in region_inputs) / batch)
