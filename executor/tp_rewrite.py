"""Make a layer's own forward run on tensor-parallel shards, whatever sizes it hard-codes.

`ColwiseParallel` / `RowwiseParallel` shard the Linears, but a forward written for the whole model keeps its global
sizes: `view(B, T, self.n_head, hs)`, `split(self.n_embd, dim=2)`, `view(B, T, C)`. `localize_layer` traces the layer
with torch.fx, follows the split dim with `profiler.tp_shapes` (the analysis the profiler offered TP with, so the two
agree) and rewrites those shape arguments to local sizes; the layer's `forward` becomes the rewritten graph's code,
bound to the layer itself, so parameter names and the module object stay the user's. A layer whose shapes need no
change keeps its own forward. Anything the analysis cannot follow is refused before training, naming the op.

The traced forward fixes Python control flow at its traced values (e.g. `if self.training`), as any fx trace does.

A fused projection (one Linear split into q, k, v) gets its output rows permuted before the colwise split, so rank r
holds the r-th chunk of every piece ([q_r, k_r, v_r]) (`mark_fused`; also a transformers Conv1D, whose output
features are its weight's columns, and an experts module's concatenated gate / up stack, dim 1). The permutation
applies to initial values (`sharded_layout`), and the weight is held in that order for the whole run, so its
checkpoints are in the permuted order of this tp degree: `fused_layouts` names such weights, and
`executor.checkpoint` refuses to resume one under another tp degree.
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
from profiler.hf_tp_derived import expert_plan, is_conv1d, linear_features, piece_order, unpermute
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
    return piece_order(segments, tp)


def _fused_width(module: nn.Module) -> int | None:
    """The output width a fused projection's pieces add up to: a Linear's / Conv1D's output features, an experts
    module's input stack's dim 1."""
    features = linear_features(module)
    if features is not None:
        return features[1]
    plan = expert_plan(module)
    return None if plan is None else int(getattr(module, plan.colwise).shape[1])


def mark_fused(layer: nn.Module, layer_name: str, spec: TensorParallelSpec, tp: int) -> None:
    """Give each fused projection the spec lists (`TPShard.segments`) the piece order its `tp`-way split needs."""
    for shard in spec.shards:
        if not shard.segments or shard.style not in (ShardStyle.COLWISE, ShardStyle.EXPERTS):
            continue
        module = layer.get_submodule(shard.module)
        if sum(shard.segments) != _fused_width(module) or any(w % tp for w in shard.segments):
            raise ExecutorError(
                f"layer '{layer_name}': fused projection '{shard.module}' has pieces {list(shard.segments)}, which do "
                f"not add up to its output width or are not divisible by tp={tp}; re-profile the model"
            )
        setattr(module, ROW_ORDER_ATTR, row_order(list(shard.segments), tp))
        setattr(module, FUSED_TP_ATTR, tp)


def localize_layer(layer: nn.Module, layer_name: str, spec: TensorParallelSpec, call: LayerCall | None,
                   tp: int) -> None:
    """Prepare `layer` (not yet sharded) for a `tp`-way split: permute fused projections, rewrite hard-coded sizes.

    Raises `ExecutorError` naming the layer and the op when the forward cannot be shown to run on shards.
    """
    colwise = {s.module: tuple(s.segments) if s.segments else None for s in spec.shards
               if s.style == ShardStyle.COLWISE}
    rowwise = {s.module for s in spec.shards if s.style == ShardStyle.ROWWISE}
    mark_fused(layer, layer_name, spec, tp)
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


def sharded_layout(module: nn.Module, name: str, whole: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """The whole initial value of tensor `name` of `module` in the order its shards are cut from (a fused
    projection's output features are permuted, see `row_order`: a Linear's weight rows, a Conv1D's weight columns,
    the bias, an experts module's input stack's dim 1); any other tensor unchanged. `inverse`: the other way, a
    whole tensor as held in the run (e.g. a DTensor's `full_tensor()`) back in the user's order."""
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    order = getattr(owner, ROW_ORDER_ATTR, None)
    if order is None:
        return whole
    plan = expert_plan(owner)
    if plan is not None:
        dim = 1 if attr == plan.colwise else None
    elif attr == "weight":
        dim = 1 if is_conv1d(owner) else 0
    else:
        dim = 0 if attr == "bias" else None
    if dim is None:
        return whole
    if inverse:
        return unpermute(whole, order, dim)
    return whole.index_select(dim, order.to(whole.device))


def fused_layouts(parts: Iterable[nn.Module]) -> dict[str, int]:
    """Fused projections held in permuted row order: Linear path -> the tp degree of that order."""
    return {name: getattr(m, FUSED_TP_ATTR) for part in parts for name, m in part.named_modules()
            if hasattr(m, FUSED_TP_ATTR)}
