"""Which tensor dim is split across tensor-parallel ranks, node by node of a layer's fx graph, and the local shapes.

One analysis serves the profiler (is TP offered for this layer, and what must the TP degree divide) and the executor
(`executor.tp_rewrite` rewrites the shape arguments so the layer's own forward runs on local shards). Both therefore
agree on what can be split.

The analysis walks a traced layer (`fx.GraphModule` with `tensor_meta` from `ShapeProp`) in order. A colwise Linear's
output is sharded on its last dim; a fused colwise Linear (one projection `split` / `chunk` / sliced into q, k, v) is
sharded per *segment*: under the executor's row permutation rank r holds the r-th contiguous chunk of every segment.
Shardedness then flows through:
- elementwise ops and activations (other operands must not vary along the sharded dim),
- split / chunk / slices on the sharded dim at segment boundaries (sizes become local: size / tp),
- view / reshape / flatten / unflatten / squeeze / unsqueeze: the sharded dim maps to the outermost output dim of its
  factor group (C -> (n_head, hs) shards n_head); in a merge the sharded dim must be the outermost one,
- transpose / permute, softmax and norms over other dims, scaled_dot_product_attention and activation-by-activation
  matmuls over a sharded head dim, cat / stack on other dims, expand / repeat_interleave,
and ends in rowwise Linears. Anything else raises `ShardError` naming the op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from profiler.fx_shapes import (
    arg_of,
    index_entries,
    norm_dim,
    op_name,
    reshape_dim,
    segment_bounds,
    set_arg,
    shape_of,
)

_ELEMENTWISE = {
    "add", "sub", "mul", "truediv", "div", "neg", "pow", "exp", "sqrt", "rsqrt", "tanh", "sigmoid", "relu", "gelu",
    "silu", "softplus", "mish", "elu", "leaky_relu", "hardswish", "dropout", "masked_fill", "where", "clamp", "clip",
    "abs", "sin", "cos", "float", "half", "bfloat16", "contiguous", "clone", "detach", "add_", "mul_", "iadd", "imul",
    "masked_fill_", "sub_", "div_", "isub", "itruediv", "square", "log", "sign", "erf", "relu_", "gelu_", "silu_",
}
_DTYPE_LIKE = {"to", "type_as", "type"}  # other arguments only give a dtype / device
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_MODULES = (
    nn.Dropout, nn.GELU, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.LeakyReLU, nn.Mish, nn.ELU,
    nn.Hardswish, nn.SELU,
)


class ShardError(Exception):
    """An op of the sharded region whose result on local shards cannot be proved to equal the whole computation."""


@dataclass(frozen=True)
class Shard:
    """A tensor split across TP ranks along `dim`; `segments` are the global widths of its segments on that dim
    (one segment: a plain contiguous split)."""

    dim: int
    segments: tuple[int, ...]


@dataclass(frozen=True)
class _SizeOf:
    """A torch.Size of a sharded tensor: entry `dim` is a local size."""

    dim: int


_LOCAL_INT = "local-int"  # an int read from a sharded dim: a local size


@dataclass
class Analysis:
    """Result of `analyze`: the sizes the TP degree must divide and how many shape arguments were made local."""

    sizes: set[int] = field(default_factory=set)
    edits: int = 0

    @property
    def divisor(self) -> int:
        """The largest TP degree every sharded size allows (gcd of the sharded dims' and segments' sizes)."""
        return math.gcd(*self.sizes) if self.sizes else 1


class _Walker:
    def __init__(self, gm: fx.GraphModule, colwise: dict[str, tuple[int, ...] | None], rowwise: set[str],
                 tp: int) -> None:
        self.modules = dict(gm.named_modules())
        self.colwise, self.rowwise, self.tp = colwise, rowwise, tp
        self.state: dict[fx.Node, Any] = {}
        self.result = Analysis()

    def fail(self, node: fx.Node, why: str) -> None:
        raise ShardError(f"'{op_name(node)}' ({node.name}) {why}")

    def shard(self, node: fx.Node, dim: int, segments: tuple[int, ...] | None = None) -> Shard:
        shape = shape_of(node)
        segments = segments or (shape[dim],)
        for s in segments:
            if self.tp > 1 and s % self.tp:
                self.fail(node, f"gives a sharded dim of size {s}, which tp={self.tp} does not divide")
        self.result.sizes.update(segments)
        return Shard(dim, segments)

    def local(self, size: int) -> int:
        self.result.edits += 1
        return size // self.tp

    def run(self, gm: fx.GraphModule) -> Analysis:
        for node in gm.graph.nodes:
            inputs = node.all_input_nodes
            states = [self.state.get(a) for a in inputs]
            if not any(s is not None for s in states):
                self.state[node] = self.start(node)
                continue
            self.state[node] = self.step(node)
        return self.result

    def start(self, node: fx.Node) -> Any:
        """A node none of whose inputs is sharded: a colwise Linear starts a shard; anything else is whole."""
        if node.op == "call_module" and node.target in self.colwise:
            segments = self.colwise[node.target]
            return self.shard(node, len(shape_of(node)) - 1, segments)
        if node.op == "call_module" and node.target in self.rowwise:
            self.fail(node, "is planned rowwise but its input is not split on features")
        return None

    def sharded_inputs(self, node: fx.Node) -> list[tuple[fx.Node, Any]]:
        return [(a, self.state[a]) for a in node.all_input_nodes if self.state.get(a) is not None]

    def step(self, node: fx.Node) -> Any:
        name = op_name(node)
        if node.op == "output":
            self.fail(node, "receives a tensor that is still split across ranks (the layer output must be whole)")
        if node.op == "call_module":
            return self.module(node, self.modules[node.target])
        x = node.args[0] if node.args else None
        sx = self.state.get(x) if isinstance(x, fx.Node) else None
        if name == "getattr":
            if node.args[1] == "shape" and isinstance(sx, Shard):
                return _SizeOf(sx.dim)
            return None if node.args[1] in ("dtype", "device", "ndim", "is_cuda") else self.fail(node, "reads an "
                                                                                                 "attribute")
        if name == "size" and isinstance(sx, Shard):
            d = arg_of(node, 1, "dim")
            if d is None:
                return _SizeOf(sx.dim)
            return _LOCAL_INT if norm_dim(d, len(shape_of(x))) == sx.dim else None
        if name == "dim":
            return None
        if name == "getitem":
            return self.getitem(node, sx)
        if any(s == _LOCAL_INT or isinstance(s, _SizeOf) for _, s in self.sharded_inputs(node)) and \
                name not in _RESHAPES | {"expand"}:
            self.fail(node, "computes with the size of a sharded dim, which differs per rank")
        if name in _DTYPE_LIKE:
            if not isinstance(sx, Shard):
                self.fail(node, "takes its dtype from a sharded tensor")
            return sx
        if name in _ELEMENTWISE:
            return self.elementwise(node)
        if name == "scaled_dot_product_attention":
            return self.attention(node)
        if name in ("matmul", "bmm"):
            return self.matmul(node)
        if name in ("cat", "concat", "stack"):
            return self.cat(node, name)
        if not isinstance(sx, Shard):
            self.fail(node, "takes a sharded tensor in a place autopar cannot follow")
        if name in ("split", "chunk", "split_with_sizes"):
            return self.split(node, x, sx, name)
        if name in _RESHAPES:
            return self.reshape(node, x, sx, name)
        if name in ("transpose", "swapaxes"):
            n = len(shape_of(x))
            a, b = norm_dim(arg_of(node, 1, "dim0"), n), norm_dim(arg_of(node, 2, "dim1"), n)
            return Shard({a: b, b: a}.get(sx.dim, sx.dim), sx.segments)
        if name == "permute":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], tuple | list) else node.args[1:]
            dims = [norm_dim(d, len(dims)) for d in dims]
            return Shard(dims.index(sx.dim), sx.segments)
        if name in ("softmax", "log_softmax"):
            if norm_dim(arg_of(node, 1, "dim"), len(shape_of(x))) == sx.dim:
                self.fail(node, "normalises over the sharded dim")
            return sx
        if name in ("layer_norm", "rms_norm"):
            normalized = arg_of(node, 1, "normalized_shape")
            if sx.dim >= len(shape_of(x)) - len(normalized):
                self.fail(node, "normalises over the sharded dim")
            return sx
        if name in _REDUCTIONS:
            return self.reduction(node, x, sx)
        if name == "expand":
            return self.expand(node, x, sx)
        if name == "repeat_interleave":
            dim = arg_of(node, 2, "dim")
            if not isinstance(arg_of(node, 1, "repeats"), int) or dim is None or len(sx.segments) > 1:
                self.fail(node, "repeats a sharded tensor in a way autopar cannot follow")
            if norm_dim(dim, len(shape_of(x))) == sx.dim:
                return self.shard(node, sx.dim)
            return sx
        self.fail(node, "is not an op tensor parallelism can run on shards (only per-feature / per-head ops may sit "
                        "between the colwise and rowwise Linears)")
        return None

    def module(self, node: fx.Node, module: nn.Module) -> Any:
        sx = self.state.get(node.args[0]) if node.args else None
        if isinstance(module, nn.Linear):
            if node.target in self.rowwise:
                if not isinstance(sx, Shard) or sx.dim != len(shape_of(node.args[0])) - 1 or len(sx.segments) > 1:
                    self.fail(node, "is planned rowwise but its input is not split on its last dim")
                return None
            self.fail(node, "is a Linear that reads a sharded tensor but is not planned rowwise")
        if isinstance(module, _MODULES):
            return self.elementwise(node)
        if isinstance(module, nn.Softmax) and isinstance(sx, Shard):
            if norm_dim(module.dim, len(shape_of(node))) == sx.dim:
                self.fail(node, "normalises over the sharded dim")
            return sx
        self.fail(node, f"is a {type(module).__name__} inside the sharded region (e.g. a norm over the split "
                        "features); only per-feature / per-head ops may sit between the colwise and rowwise Linears")
        return None

    def elementwise(self, node: fx.Node) -> Shard:
        out = shape_of(node)
        found: Shard | None = None
        for a in node.all_input_nodes:
            s, shape = self.state.get(a), shape_of(a)
            if shape is None:
                if s is not None:
                    self.fail(node, "computes with the size of a sharded dim, which differs per rank")
                continue
            if isinstance(s, Shard):
                cand = Shard(s.dim + len(out) - len(shape), s.segments)
                if found is not None and cand != found:
                    self.fail(node, "combines tensors split along different dims")
                found = cand
        for a in node.all_input_nodes:
            shape = shape_of(a)
            if shape is not None and self.state.get(a) is None:
                aligned = found.dim - (len(out) - len(shape))
                if aligned >= 0 and shape[aligned] != 1:
                    self.fail(node, f"combines the sharded tensor with the whole tensor '{a.name}', which has the "
                                    "sharded dim too")
        return found

    def getitem(self, node: fx.Node, sx: Any) -> Any:
        x, index = node.args
        if isinstance(sx, tuple):
            return sx[index]
        if isinstance(sx, _SizeOf):
            if isinstance(index, int):
                return _LOCAL_INT if index % len(shape_of(x.args[0]) or (0,)) == sx.dim else None
            self.fail(node, "slices the size of a sharded tensor")
        if not isinstance(sx, Shard):
            self.fail(node, "indexes with a sharded value")
        entries = index_entries(index, len(shape_of(x)))
        if entries is None:
            self.fail(node, "indexes a sharded tensor with a tensor or another index autopar cannot follow")
        item = entries[sx.dim]
        segments = sx.segments
        if isinstance(item, int):
            self.fail(node, "picks one entry of the sharded dim")
        if item != slice(None):
            start, stop, step = item.indices(shape_of(x)[sx.dim])
            segments = self.cut(node, sx, start, stop, step)
            entries = dict(entries)
            items = list(index) if isinstance(index, tuple) else [index]
            pos = self.index_position(items, sx.dim, len(shape_of(x)))
            items[pos] = slice(self.local(start) if start else None, self.local(stop))
            if self.tp > 1:
                node.update_arg(1, tuple(items) if isinstance(index, tuple) else items[0])
        before = sum(1 for d, it in entries.items() if d < sx.dim and isinstance(it, int))
        inserted = self.inserted_before(index, sx.dim, len(shape_of(x)))
        return self.shard(node, sx.dim - before + inserted, segments)

    @staticmethod
    def index_position(items: list, dim: int, ndim: int) -> int:
        consumed = 0
        for pos, item in enumerate(items):
            if item is None:
                continue
            if item is Ellipsis:
                width = ndim - sum(1 for i in items if i is not None and i is not Ellipsis)
                if consumed + width > dim:
                    raise ShardError("a slice of the sharded dim under '...' cannot be made local")
                consumed += width
                continue
            if consumed == dim:
                return pos
            consumed += 1
        raise ShardError("index position not found")

    @staticmethod
    def inserted_before(index: Any, dim: int, ndim: int) -> int:
        items = list(index) if isinstance(index, tuple) else [index]
        consumed, inserted = 0, 0
        for item in items:
            if consumed > dim:
                break
            if item is None:
                inserted += 1
            elif item is Ellipsis:
                consumed += ndim - sum(1 for i in items if i is not None and i is not Ellipsis)
            else:
                consumed += 1
        return inserted

    def cut(self, node: fx.Node, sx: Shard, start: int, stop: int, step: int) -> tuple[int, ...]:
        bounds = segment_bounds(sx.segments)
        if step != 1 or start not in bounds or stop not in bounds:
            self.fail(node, f"cuts the sharded dim at [{start}:{stop}], not at a head / segment boundary "
                            f"{bounds}")
        return tuple(s for s, a in zip(sx.segments, bounds) if start <= a < stop)

    def split(self, node: fx.Node, x: fx.Node, sx: Shard, name: str) -> tuple:
        ndim = len(shape_of(x))
        dim = norm_dim(arg_of(node, 2, "dim", 0), ndim)
        pieces = [int(m.shape[dim]) for m in node.meta["tensor_meta"]]
        if dim != sx.dim:
            return tuple(Shard(sx.dim, sx.segments) for _ in pieces)
        outs, at = [], 0
        for p in pieces:
            outs.append(Shard(sx.dim, self.cut(node, sx, at, at + p, 1)))
            at += p
        if name == "chunk":
            if len(set(pieces)) > 1:
                self.fail(node, "chunks the sharded dim into unequal pieces")
        else:
            key = next((k for k in ("split_size", "split_size_or_sections", "split_sizes") if k in node.kwargs), "")
            sizes = node.kwargs[key] if key else node.args[1]
            new = self.local(sizes) if isinstance(sizes, int) else [self.local(p) for p in pieces]
            if self.tp > 1:
                set_arg(node, 1, key, new)
        self.result.sizes.update(s for o in outs for s in o.segments)
        return tuple(outs)

    def reshape(self, node: fx.Node, x: fx.Node, sx: Shard, name: str) -> Shard:
        inp, out = shape_of(x), shape_of(node)
        j = reshape_dim(inp, out, sx.dim)
        if j is None:
            self.fail(node, f"reshapes {inp} -> {out} so that the sharded dim {sx.dim} is not the outermost of "
                            "the dims it becomes or joins")
        if len(sx.segments) > 1 and out[j] != inp[sx.dim]:
            self.fail(node, "reshapes a fused projection's output before splitting it into its parts")
        if name in ("view", "reshape"):
            self.shape_args(node, 1, j, out)
        elif name == "unflatten":
            dim = norm_dim(arg_of(node, 1, "dim"), len(inp))
            sizes = list(arg_of(node, 2, "sizes"))
            if dim <= j < dim + len(sizes) and sizes[j - dim] != -1:
                sizes[j - dim] = self.local(out[j])
                if self.tp > 1:
                    set_arg(node, 2, "sizes", tuple(sizes))
        return self.shard(node, j, sx.segments if len(sx.segments) > 1 else None)

    def shape_args(self, node: fx.Node, first: int, j: int, out: tuple[int, ...]) -> None:
        """Make entry j of a view / reshape / expand size list local (an entry of -1 stays)."""
        args = list(node.args)
        packed = len(args) == first + 1 and isinstance(args[first], tuple | list)
        if len(args) == first + 1 and isinstance(args[first], fx.Node):
            s = self.state.get(args[first])
            if isinstance(s, _SizeOf) and s.dim == j:
                return  # the size of a tensor sharded the same way: local already
            self.fail(node, "takes its shape as one value autopar cannot make local")
        if "size" in node.kwargs or "shape" in node.kwargs:
            self.fail(node, "takes its shape as a keyword autopar cannot make local")
        sizes = list(args[first]) if packed else args[first:]
        if len(sizes) != len(out):
            self.fail(node, "has a size list autopar cannot read")
        if sizes[j] == -1:
            return
        sizes[j] = self.local(out[j])
        if self.tp > 1:
            node.args = tuple(args[:first] + ([type(args[first])(sizes)] if packed else sizes))

    def reduction(self, node: fx.Node, x: fx.Node, sx: Shard) -> Shard:
        ndim = len(shape_of(x))
        dims = arg_of(node, 1, "dim")
        if dims is None:
            self.fail(node, "reduces over every dim, the sharded one included")
        dims = {norm_dim(d, ndim) for d in (dims if isinstance(dims, tuple | list) else [dims])}
        if sx.dim in dims:
            self.fail(node, "reduces over the sharded dim")
        keep = arg_of(node, 2, "keepdim", False)
        return Shard(sx.dim if keep else sx.dim - sum(d < sx.dim for d in dims), sx.segments)

    def attention(self, node: fx.Node) -> Shard:
        q, k, v = node.args[:3]
        states = [self.state.get(t) for t in (q, k, v)]
        dims = {s.dim if isinstance(s, Shard) else None for s in states}
        if len(dims) != 1 or None in dims or next(iter(dims)) >= len(shape_of(q)) - 2:
            self.fail(node, "needs q, k and v all split along the same head dim")
        mask = arg_of(node, 3, "attn_mask")
        if isinstance(mask, fx.Node) and self.state.get(mask) is None:
            aligned = states[0].dim - (len(shape_of(q)) - len(shape_of(mask)))
            if aligned >= 0 and shape_of(mask)[aligned] != 1:
                self.fail(node, "has an attention mask that differs per head")
        return self.shard(node, states[0].dim)

    def matmul(self, node: fx.Node) -> Shard:
        a, b = node.args[:2]
        sa, sb = self.state.get(a), self.state.get(b)
        n = len(shape_of(node))
        if not isinstance(sa, Shard) or not isinstance(sb, Shard):
            self.fail(node, "multiplies a sharded tensor by a whole one (a weight would mix the split features)")
        da, db = sa.dim + n - len(shape_of(a)), sb.dim + n - len(shape_of(b))
        if da != db or da >= n - 2:
            self.fail(node, "contracts over the sharded dim or mixes different sharded dims")
        return self.shard(node, da)

    def cat(self, node: fx.Node, name: str) -> Shard:
        tensors = node.args[0]
        states = [self.state.get(t) for t in tensors]
        if any(not isinstance(s, Shard) for s in states) or len({s.dim for s in states}) != 1:
            self.fail(node, "joins sharded and whole tensors, or tensors split along different dims")
        ndim = len(shape_of(tensors[0]))
        dim = arg_of(node, 1, "dim", 0)
        sd = states[0].dim
        if name == "stack":
            dim = norm_dim(dim, ndim + 1)
            return Shard(sd + (dim <= sd), states[0].segments)
        if norm_dim(dim, ndim) == sd:
            self.fail(node, "concatenates along the sharded dim")
        return states[0]

    def expand(self, node: fx.Node, x: fx.Node, sx: Shard) -> Shard:
        out = shape_of(node)
        j = sx.dim + len(out) - len(shape_of(x))
        self.shape_args(node, 1, j, out)
        return Shard(j, sx.segments)


def analyze(gm: fx.GraphModule, colwise: dict[str, tuple[int, ...] | None], rowwise: set[str],
            tp: int = 1) -> Analysis:
    """Follow the split dim through `gm` (shapes from ShapeProp) for the given colwise Linears (with their fused
    segment widths, or None) and rowwise Linears; raise `ShardError` naming the first op it cannot follow.

    With `tp > 1` the graph's shape arguments are rewritten in place to the local sizes of a `tp`-way split
    (`gm.recompile()` is the caller's); with tp = 1 the graph is only checked.
    """
    return _Walker(gm, colwise, rowwise, tp).run(gm)
