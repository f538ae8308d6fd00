"""Reading fx nodes for the tensor-parallel shape analysis (`profiler.tp_shapes`): op names, shapes and arguments,
the fused-projection segments of colwise Linears, index and reshape bookkeeping."""

from __future__ import annotations

import math
from typing import Any

from torch import fx


def op_name(node: fx.Node) -> str:
    """The op's name: method or module target, or the function's `__name__`."""
    if node.op in ("call_method", "call_module"):
        return str(node.target)
    return getattr(node.target, "__name__", str(node.target))


def shape_of(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in meta.shape) if hasattr(meta, "shape") else None


def arg_of(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[pos] if len(node.args) > pos else default


def set_arg(node: fx.Node, pos: int, name: str, value: Any) -> None:
    if name in node.kwargs:
        node.update_kwarg(name, value)
    else:
        node.update_arg(pos, value)


def norm_dim(dim: int, ndim: int) -> int:
    return dim % ndim if ndim else dim


def find_segments(gm: fx.GraphModule, colwise: list[str]) -> dict[str, tuple[int, ...]]:
    """Colwise Linears whose output is split on its feature dim, with the global width of each piece."""
    out: dict[str, tuple[int, ...]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target not in colwise:
            continue
        width = shape_of(node)[-1]
        for user in node.users:
            name = op_name(user)
            pieces = None
            if name in ("split", "chunk", "split_with_sizes", "tensor_split") and isinstance(user.meta.get(
                    "tensor_meta"), (tuple, list)):
                dim = arg_of(user, 2, "dim", 0)  # split(size, dim) and chunk(chunks, dim) alike
                if isinstance(dim, int) and norm_dim(dim, len(shape_of(node))) == len(shape_of(node)) - 1:
                    pieces = tuple(int(m.shape[-1]) for m in user.meta["tensor_meta"])
            elif name == "getitem" and isinstance(user.args[1], tuple | slice):
                pieces = slice_pieces(user.args[1], shape_of(node))
            if pieces and sum(pieces) == width and len(pieces) > 1:
                if node.target in out and out[node.target] != pieces:
                    cuts = sorted({*segment_bounds(out[node.target]), *segment_bounds(pieces)})
                    pieces = tuple(b - a for a, b in zip(cuts, cuts[1:]))
                out[node.target] = pieces
    return out


def segment_bounds(pieces: tuple[int, ...]) -> list[int]:
    return [0, *(sum(pieces[:i + 1]) for i in range(len(pieces)))]


def slice_pieces(index: Any, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """A last-dim slice [a:b] of a feature vector of width W as the pieces (a, b - a, W - b) without zeros."""
    entries = index_entries(index, len(shape))
    if entries is None or not isinstance(entries.get(len(shape) - 1), slice):
        return None
    width = shape[-1]
    start, stop, step = entries[len(shape) - 1].indices(width)
    if step != 1:
        return None
    return tuple(p for p in (start, stop - start, width - stop) if p > 0)


def index_entries(index: Any, ndim: int) -> dict[int, Any] | None:
    """Input dim -> the index entry applied to it (None-insertions skipped); None when it cannot be read."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(i is Ellipsis for i in items) > 1:
        return None
    consuming = [i for i in items if i is not None and i is not Ellipsis]
    if Ellipsis in items:
        at = items.index(Ellipsis)
        fill = ndim - len(consuming)
        items = items[:at] + [slice(None)] * fill + items[at + 1:]
    out, dim = {}, 0
    for item in items:
        if item is None:
            continue
        if not isinstance(item, int | slice):
            return None
        out[dim] = item
        dim += 1
    for d in range(dim, ndim):
        out[d] = slice(None)
    return out


def reshape_dim(inp: tuple[int, ...], out: tuple[int, ...], d: int) -> int | None:
    """Output dim that carries input dim d's split through a reshape (outermost of its factor group), or None."""
    start, size = math.prod(inp[:d]), inp[d]
    pre = 1
    for j, s in enumerate(out):
        if pre == start and s > 1:
            break
        pre *= s
        if pre > start:
            return None  # the sharded dim starts inside an output dim: not the outermost of a merge
    else:
        return None
    if out[j] == size:
        return j
    if out[j] < size:  # split: some output dims j..k multiply to size exactly
        return j if start * size in size_prefixes(out) else None
    if out[j] % size:
        return None
    return j if math.prod(out[:j + 1]) in size_prefixes(inp) else None  # merge with whole inner input dims


def size_prefixes(shape: tuple[int, ...]) -> set[int]:
    return {math.prod(shape[:i]) for i in range(len(shape) + 1)}
