"""Make a layer's own forward run on tensor-parallel shards, whatever sizes it hard-codes.

`ColwiseParallel` / `RowwiseParallel` shard the Linears, but a forward written for the whole model keeps its global
sizes: `view(B, T, self.n_head, hs)`, `split(self.n_embd, dim=2)`, `view(B, T, C)`. `localize_layer` traces the layer
with torch.fx, follows the split dim with `profiler.tp_shapes` (the analysis the profiler offered TP with, so the two
agree) and rewrites those shape arguments to local sizes; the layer's `forward` becomes the rewritten graph's code,
bound to the layer itself, so parameter names and the module object stay the user's. A layer whose shapes need no
change keeps its own forward. Anything the analysis cannot follow is refused before training, naming the op.

The traced forward fixes Python control flow at its traced values (e.g. `if self.training`), as any fx trace does.

A fused projection (one Linear split into q, k, v) gets its output rows permuted before the colwise split, so rank r
holds the r-th chunk of every piece ([q_r, k_r, v_r]). The permutation applies to initial values
(`sharded_layout`), and the weight is held in that order for the whole run, so its checkpoints are in the permuted
order of this tp degree: `fused_layouts` names such weights, and `executor.checkpoint` refuses to resume one under
another tp degree.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from executor.errors import ExecutorError
from planner.model_profile import ModelProfile, ShardStyle, TensorParallelSpec
from profiler.recording import LayerCall, record_calls
from profiler.tensor_parallel import trace_layer
from profiler.tp_shapes import ShardError, analyze

log = logging.getLogger(__name__)

#: Attributes set on a fused colwise Linear: the row order of its sharded weight, and the tp degree it was made for.
ROW_ORDER_ATTR = "_autopar_row_order"
FUSED_TP_ATTR = "_autopar_fused_tp"


def record_tp_calls(meta_model: nn.Module, profile: ModelProfile, example_inputs: tuple) -> dict[str, LayerCall]:
    """What each TP-able layer receives in one forward of the meta model on `example_inputs` (positional, meta)."""
    names = [layer.name for layer in profile.layers if layer.tp is not None]
    if not names:
        return {}
    try:
        return record_calls(meta_model, tuple(example_inputs), names, clone=False)
    except Exception as exc:  # noqa: BLE001 - any failure here means the model cannot be run for the rewrite
        raise ExecutorError(
            f"tensor parallelism needs one forward of the model on the meta device to learn its layers' shapes, and "
            f"it failed ({type(exc).__name__}: {exc}); pass example_inputs shaped like a real batch, or plan tp=1"
        ) from None


def row_order(segments: list[int], tp: int) -> torch.Tensor:
    """Row i of the permuted weight is row `order[i]` of the user's: rank r's rows are the r-th chunk of each piece."""
    starts = [sum(segments[:i]) for i in range(len(segments))]
    rows = [
        torch.arange(start + r * width // tp, start + (r + 1) * width // tp)
        for r in range(tp) for start, width in zip(starts, segments)
    ]
    return torch.cat(rows)


def localize_layer(layer: nn.Module, layer_name: str, spec: TensorParallelSpec, call: LayerCall | None,
                   tp: int) -> None:
    """Prepare `layer` (not yet sharded) for a `tp`-way split: permute fused projections, rewrite hard-coded sizes.

    Raises `ExecutorError` naming the layer and the op when the forward cannot be shown to run on shards.
    """
    colwise = {s.module: tuple(s.segments) if s.segments else None for s in spec.shards
               if s.style == ShardStyle.COLWISE}
    rowwise = {s.module for s in spec.shards if s.style == ShardStyle.ROWWISE}
    for name, segments in colwise.items():
        if segments:
            if sum(segments) != layer.get_submodule(name).out_features or any(w % tp for w in segments):
                raise ExecutorError(
                    f"layer '{layer_name}': fused projection '{name}' has pieces {list(segments)}, which do not add "
                    f"up to its output width or are not divisible by tp={tp}; re-profile the model"
                )
            linear = layer.get_submodule(name)
            setattr(linear, ROW_ORDER_ATTR, row_order(list(segments), tp))
            setattr(linear, FUSED_TP_ATTR, tp)
    if call is None:
        raise ExecutorError(f"layer '{layer_name}' was not called in the forward used to learn its shapes; "
                            "re-profile the model with the inputs it is trained on")
    try:
        gm = trace_layer(layer, call)
    except Exception as exc:  # noqa: BLE001 - the profiler could not have proposed a split it could not trace
        raise ExecutorError(
            f"layer '{layer_name}': torch.fx cannot trace it ({type(exc).__name__}: {exc}), so its forward cannot be "
            "checked for tensor parallelism; plan it with tp=1 or set autopar_tp_plan = None on the layer"
        ) from None
    try:
        result = analyze(gm, colwise, rowwise, tp)
    except ShardError as exc:
        raise ExecutorError(
            f"layer '{layer_name}': tensor parallelism cannot run its forward on shards: {exc}; plan tp=1 for this "
            "model, or set autopar_tp_plan = None on the layer's class"
        ) from None
    if not result.edits:
        return  # the forward already infers local sizes: keep the user's own code
    gm.recompile()
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not _resolves(layer, node.target):
            raise ExecutorError(f"layer '{layer_name}': its traced forward keeps a constant '{node.target}' that is "
                                "not an attribute of the layer; plan tp=1 for it")
    layer.forward = types.MethodType(type(gm).forward, layer)
    log.info("layer '%s': %d shape arguments made local for tp=%d", layer_name, result.edits, tp)


def _resolves(module: nn.Module, target: str) -> bool:
    obj: Any = module
    for part in target.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def sharded_layout(module: nn.Module, name: str, whole: torch.Tensor) -> torch.Tensor:
    """The whole initial value of tensor `name` of `module` in the row order its shards are cut from (a fused
    projection's weight and bias are permuted, see `row_order`); any other tensor unchanged."""
    owner, _, attr = name.rpartition(".")
    order = getattr(module.get_submodule(owner) if owner else module, ROW_ORDER_ATTR, None)
    if order is None or attr not in ("weight", "bias"):
        return whole
    return whole.index_select(0, order.to(whole.device))


def fused_layouts(parts: Iterable[nn.Module]) -> dict[str, int]:
    """Fused projections held in permuted row order: Linear path -> the tp degree of that order."""
    return {name: getattr(m, FUSED_TP_ATTR) for part in parts for name, m in part.named_modules()
            if hasattr(m, FUSED_TP_ATTR)}
