"""Where a layer can be split Megatron-style: colwise Linears whose outputs reach rowwise Linears.

Detection follows the layer's traced dataflow (torch.fx, shapes propagated on meta). A Linear fed by the replicated
activation starts a sharded region; the region may pass only through ops that act per feature or per attention
head (elementwise ops, activations, dropout, reshapes, RoPE, softmax, attention, activation-by-activation matmuls)
and must end in Linears, which become rowwise; each rowwise output must then feed a residual add (or the layer
output). Anything else touching the region (a norm, a reduction, mixing with the replicated stream, leaving the
layer) leaves the whole group replicated. A fused projection (one Linear whose output is split / chunked / sliced
on its features into q, k, v) is sharded per piece (`TPShard.segments`). Each group is then checked by
`profiler.tp_shapes`, the analysis the executor rewrites the layer's shapes with, so TP is offered only where the
layer's own forward can run on local shards; the divisor is the gcd of every sharded size it finds (heads, or KV
heads with grouped-query attention).

User override: a layer module (or its class) may set `autopar_tp_plan = {"attn.q_proj": "colwise", ...}` with
paths relative to the layer (or `None` to forbid TP), `autopar_tp_divisor = <int>` (attention heads, or KV heads
with grouped-query attention; default: gcd of the colwise output widths) and `autopar_tp_segments = {"attn.qkv":
[768, 768, 768]}` (the pieces of a fused colwise projection; default: found by tracing the layer). Besides
nn.Linear, a plan may name transformers' `Conv1D` (colwise / rowwise), an experts module that
`profiler.hf_tp_derived.EXPERT_PLANS` knows (style `experts`) and a module kept whole whose gradients are summed over
the group (style `replicated`: a per-head norm).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from planner.model_profile import SequenceParallelSpec, ShardStyle, TensorParallelSpec, TPShard
from profiler.errors import ProfileError
from profiler.fx_shapes import find_segments
from profiler.hf_tp_derived import expert_plan, linear_features
from profiler.recording import LayerCall
from profiler.sequence_parallel import detect_sequence_parallel
from profiler.tp_shapes import ShardError, analyze

logger = logging.getLogger(__name__)

_MISSING = object()
_TRANSPARENT_CALLS = {
    "add", "sub", "mul", "truediv", "div", "neg", "pow", "exp", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "gelu",
    "silu", "softplus", "mish", "elu", "leaky_relu", "hardswish", "dropout", "masked_fill", "where", "clamp", "clip",
    "abs", "sin", "cos", "float", "half", "bfloat16", "to", "type_as", "type", "contiguous", "clone", "detach",
    "softmax", "scaled_dot_product_attention", "matmul", "bmm", "view", "reshape", "transpose", "permute",
    "flatten", "unflatten", "unsqueeze", "squeeze", "expand", "expand_as", "repeat", "repeat_interleave", "getitem",
    "split", "chunk", "cat", "stack", "narrow", "add_", "mul_", "iadd", "imul", "masked_fill_", "view_as",
}
_TRANSPARENT_MODULES = (
    nn.Dropout, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Softmax, nn.LeakyReLU, nn.Mish,
    nn.ELU, nn.Hardswish, nn.SELU,
)
_ADDS = {"add", "iadd", "add_"}


def _op_name(node: fx.Node) -> str:
    if node.op in ("call_method", "call_module"):
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def _has_shape(meta: Any) -> bool:
    return hasattr(meta, "shape") or isinstance(meta, (tuple, list)) and any(_has_shape(m) for m in meta)


def _is_tensor(node: Any) -> bool:
    """True when the node produces a tensor or a tuple of tensors (split, chunk)."""
    return isinstance(node, fx.Node) and _has_shape(node.meta.get("tensor_meta"))


class _Groups:
    """Union-find over colwise Linears, with rowwise Linears and an 'invalid' mark per group."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}
        self.rowwise: dict[str, set[str]] = {}
        self.invalid: set[str] = set()

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            x = self.parent[x]
        return x

    def union(self, members: set[str]) -> str:
        roots = {self.find(m) for m in members}
        root = min(roots)
        for r in roots:
            self.parent[r] = root
            if r != root:
                self.rowwise.setdefault(root, set()).update(self.rowwise.pop(r, set()))
                if r in self.invalid:
                    self.invalid.add(root)
        return root

    def poison(self, members: set[str]) -> None:
        self.invalid.add(self.union(members))


def _detect_groups(gm: fx.GraphModule) -> tuple[_Groups, dict[str, fx.Node]]:
    modules = dict(gm.named_modules())
    groups = _Groups()
    linear_nodes: dict[str, fx.Node] = {}
    # state per node: "const", "repl", or frozenset of colwise Linear names the value is sharded by
    state: dict[fx.Node, Any] = {}
    for node in gm.graph.nodes:
        tensor_args = [a for a in node.all_input_nodes if _is_tensor(a)]
        shard_sets = [state[a] for a in tensor_args if isinstance(state.get(a), frozenset)]
        sharded = set().union(*shard_sets) if shard_sets else set()
        replicated = any(state.get(a) == "repl" for a in tensor_args)
        if node.op == "placeholder":
            state[node] = "repl" if _is_tensor(node) else "const"
            continue
        if node.op == "get_attr" or not _is_tensor(node) and node.op != "output":
            state[node] = "const"  # parameters, buffers, shapes and other non-tensor values
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.Linear):
            linear_nodes[node.target] = node
            if sharded and not replicated:
                groups.rowwise.setdefault(groups.union(sharded), set()).add(node.target)
                state[node] = "repl"
            else:
                if sharded:
                    groups.poison(sharded)
                groups.find(node.target)
                state[node] = frozenset({node.target})
            continue
        transparent = (
            isinstance(module, _TRANSPARENT_MODULES) if module is not None
            else node.op in ("call_function", "call_method") and _op_name(node) in _TRANSPARENT_CALLS
        )
        if _op_name(node) in ("matmul", "bmm") and any(state.get(a) == "const" for a in tensor_args):
            transparent = False  # a raw weight matrix would mix the sharded features
        if not sharded:
            state[node] = "repl" if replicated else "const"
        elif transparent:  # mixing with whole tensors: profiler.tp_shapes checks the broadcast
            groups.union(sharded)
            state[node] = frozenset(sharded)
        else:
            groups.poison(sharded)
            state[node] = "repl"
    _check_residual_adds(gm, groups, linear_nodes)
    return groups, linear_nodes


def _check_residual_adds(gm: fx.GraphModule, groups: _Groups, linear_nodes: dict[str, fx.Node]) -> None:
    """A rowwise output must reach an add (the residual) or the layer output through single-input ops only."""
    for root, rows in list(groups.rowwise.items()):
        for row in rows:
            node, ok = linear_nodes[row], False
            for _ in range(8):
                users = list(node.users)
                if any(u.op == "output" or _op_name(u) in _ADDS for u in users):
                    ok = True
                    break
                if len(users) != 1 or len(users[0].all_input_nodes) != 1:
                    break
                node = users[0]
            if not ok:
                groups.invalid.add(groups.find(root))


def trace_layer(module: nn.Module, call: LayerCall) -> fx.GraphModule:
    """The layer traced by torch.fx, with every node's `tensor_meta` from one run on the recorded call's arguments."""
    gm = fx.symbolic_trace(module)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = list(call.args)
    for node in placeholders[len(args):]:
        if node.target in call.kwargs:
            args.append(call.kwargs[node.target])
        elif node.args:
            args.append(node.args[0])
        else:
            args.append(None)
    with torch.no_grad():
        ShapeProp(gm).propagate(*args)
    return gm


def _spec(
    module: nn.Module, colwise: list[str], rowwise: list[str], divisor: int, row_out_bytes: list[float],
    segments: dict[str, tuple[int, ...]], sequence_parallel: SequenceParallelSpec | None = None,
    experts: list[str] = (), replicated: list[str] = (),
) -> TensorParallelSpec:
    """`row_out_bytes`: per sample, the output of each rowwise Linear and then of each experts module. `replicated`
    modules stay whole on every rank; their gradients' sum over the group (a few per-head-width vectors) is not
    costed."""
    sharded = 0
    for name in colwise:
        sharded += sum(p.numel() for p in module.get_submodule(name).parameters())
    for name in rowwise:
        sharded += module.get_submodule(name).weight.numel()
    for name in experts:  # both weight stacks, split along the intermediate features
        sub = module.get_submodule(name)
        plan = expert_plan(sub)
        sharded += getattr(sub, plan.colwise).numel() + getattr(sub, plan.rowwise).numel()
    shards = [TPShard(module=n, style=ShardStyle.COLWISE, segments=list(segments[n]) if n in segments else None)
              for n in colwise]
    shards += [TPShard(module=n, style=ShardStyle.ROWWISE) for n in rowwise]
    shards += [TPShard(module=n, style=ShardStyle.EXPERTS, segments=list(segments[n]) if n in segments else None)
               for n in experts]
    shards += [TPShard(module=n, style=ShardStyle.REPLICATED) for n in replicated]
    return TensorParallelSpec(
        shards=shards,
        divisor=max(divisor, 1),
        sharded_param_count=sharded,
        # an experts module sums its output across the group, as a rowwise Linear does
        allreduces_per_forward=len(rowwise) + len(experts),
        # DTensor's ColwiseParallel turns its replicated input's gradient from partial to whole on its own: one
        # all-reduce per colwise Linear in backward (separate q/k/v: three; Megatron's one `f` before them: one).
        # Those gradients are the block's hidden width, as the rowwise outputs are. An experts module's token input
        # likewise (its routing weights' gradient, tokens x top-k values, is a further small all-reduce, not
        # counted: latency only).
        allreduces_per_backward=len(colwise) + len(experts),
        allreduce_bytes=sum(row_out_bytes) / max(len(row_out_bytes), 1),
        sequence_parallel=sequence_parallel,
    )


def detect_tensor_parallel(module: nn.Module, call: LayerCall, batch: int) -> TensorParallelSpec | None:
    """The layer's TP spec (shard paths relative to the layer), or None when it cannot be split."""
    plan = getattr(module, "autopar_tp_plan", _MISSING)
    if plan is not _MISSING:
        return _from_override(module, call, plan, batch)
    try:
        gm = trace_layer(module, call)
    except Exception as exc:  # noqa: BLE001 - an untraceable layer simply gets no automatic TP
        logger.info("no automatic tensor parallelism for %s: fx cannot trace it (%s)", type(module).__name__, exc)
        return None
    groups, linear_nodes = _detect_groups(gm)
    colwise, rowwise = [], []
    for root, rows in groups.rowwise.items():
        if groups.find(root) in groups.invalid or not rows:
            continue
        cols = [n for n in groups.parent if groups.find(n) == root and n not in rows]
        try:  # the executor's analysis must be able to run this group on shards
            analyze(gm, _with_segments(gm, cols), set(rows))
        except ShardError as exc:
            logger.info("no tensor parallelism for %s (%s): %s", type(module).__name__, ", ".join(cols), exc)
            continue
        colwise += cols
        rowwise += sorted(rows)
    if not rowwise:
        return None
    order = list(linear_nodes)
    colwise.sort(key=order.index)
    rowwise.sort(key=order.index)
    segments = _with_segments(gm, colwise)
    divisor = analyze(gm, segments, set(rowwise)).divisor
    row_bytes = [_bytes_of(linear_nodes[r].meta["tensor_meta"]) / batch for r in rowwise]
    sp = detect_sequence_parallel(gm, module, segments, rowwise, divisor, batch)  # last use of gm: may rewrite it
    return _spec(module, colwise, rowwise, divisor, row_bytes, {n: s for n, s in segments.items() if s}, sp)


def _with_segments(gm: fx.GraphModule, colwise: list[str]) -> dict[str, tuple[int, ...] | None]:
    """Each colwise Linear with the widths of the pieces its output is split into (None: not fused)."""
    fused = find_segments(gm, colwise)
    return {c: fused.get(c) for c in colwise}


def _bytes_of(meta: Any) -> float:
    return float(math.prod(meta.shape) * torch.tensor([], dtype=meta.dtype).element_size())


def _from_override(module: nn.Module, call: LayerCall, plan: Any, batch: int) -> TensorParallelSpec | None:
    if plan is None:
        return None
    if not isinstance(plan, dict) or not plan:
        raise ProfileError(f"{type(module).__name__}.autopar_tp_plan must be a dict {{path: 'colwise'|'rowwise'}} "
                           "or None")
    linears = [n for n, m in module.named_modules() if linear_features(m) is not None]
    expert_modules = [n for n, m in module.named_modules() if expert_plan(m) is not None]
    styles: dict[str, ShardStyle] = {}
    for path, style in plan.items():
        try:
            styles[path] = ShardStyle(style)
        except ValueError:
            raise ProfileError(f"autopar_tp_plan['{path}'] is '{style}'; use 'colwise', 'rowwise' or, on an experts "
                               "module, 'experts'") from None
        if styles[path] == ShardStyle.REPLICATED:
            owner = dict(module.named_modules()).get(path)
            if owner is None or not any(True for _ in owner.parameters(recurse=False)):
                raise ProfileError(f"{type(module).__name__}.autopar_tp_plan names '{path}' as replicated, but it is not "
                                   "a module with parameters in the layer")
            continue
        if styles[path] == ShardStyle.EXPERTS and path not in expert_modules:
            raise ProfileError(f"{type(module).__name__}.autopar_tp_plan names '{path}' as experts, but it is not an "
                               "experts module autopar can shard; its experts modules are "
                               f"{', '.join(expert_modules) or 'none'}")
        if styles[path] != ShardStyle.EXPERTS and (path not in linears or styles[path] not in (
                ShardStyle.COLWISE, ShardStyle.ROWWISE)):
            raise ProfileError(f"{type(module).__name__}.autopar_tp_plan names '{path}' as '{style}'; a plan's "
                               "entries are 'colwise' or 'rowwise' Linears (or Conv1Ds) in the layer, whose Linears "
                               f"are {', '.join(linears) or 'none'}")
    colwise = [p for p in linears if styles.get(p) == ShardStyle.COLWISE]
    rowwise = [p for p in linears if styles.get(p) == ShardStyle.ROWWISE]
    experts = [p for p in expert_modules if styles.get(p) == ShardStyle.EXPERTS]
    replicated = [p for p, st in styles.items() if st == ShardStyle.REPLICATED]
    out_bytes: dict[str, float] = {}
    handles = [
        module.get_submodule(p).register_forward_hook(
            lambda _m, _a, out, p=p: out_bytes.__setitem__(p, float(out.numel() * out.element_size()) / batch)
        )
        for p in [*rowwise, *experts]
    ]
    try:
        with torch.no_grad():
            module(*call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    default = math.gcd(*[linear_features(module.get_submodule(c))[1] for c in colwise]) if colwise else 1
    divisor = int(getattr(module, "autopar_tp_divisor", default))
    given = getattr(module, "autopar_tp_segments", None)
    if given is not None:  # the pieces of the fused projections, as the plan's author knows them
        segments = {p: tuple(int(w) for w in widths) for p, widths in dict(given).items()}
        for p, widths in segments.items():
            width = linear_features(module.get_submodule(p))[1] if p in colwise else (
                getattr(module.get_submodule(p), expert_plan(module.get_submodule(p)).colwise).shape[1]
                if p in experts else None)
            if width is None or sum(widths) != width:
                raise ProfileError(f"{type(module).__name__}.autopar_tp_segments['{p}'] is {list(widths)}: it must "
                                   "name a colwise (or experts) entry of autopar_tp_plan and add up to its width")
    else:
        try:  # a fused projection among the planned colwise Linears is sharded per piece
            segments = find_segments(trace_layer(module, call), colwise)
        except Exception as exc:  # noqa: BLE001 - untraceable: no piece widths; the executor refuses what it cannot run
            logger.info("%s: fx cannot trace it (%s); no fused projection recorded", type(module).__name__, exc)
            segments = {}
    spec = _spec(module, colwise, rowwise, divisor, [out_bytes.get(r, 0.0) for r in [*rowwise, *experts]], segments,
                 experts=experts, replicated=replicated)
    head_params = int(getattr(module, "autopar_tp_head_params", 0))  # per-head tables split with the heads (T5)
    return spec.model_copy(update={"sharded_param_count": spec.sharded_param_count + head_params})
