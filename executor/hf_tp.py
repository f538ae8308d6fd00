"""Tensor parallelism for Hugging Face transformers layers, whose forward torch.fx cannot trace.

The profiler takes these layers' shards from the model's own `base_model_tp_plan` (`profiler.hf`): plain colwise /
rowwise Linears, never a fused projection. transformers' attention infers local sizes itself
(`view(*input_shape, -1, head_dim)`, `reshape(*input_shape, -1)`, KV groups as a ratio of heads), so the layer's
forward runs on shards unchanged and `ColwiseParallel` / `RowwiseParallel` alone train the same function; the
shape rewrite of `executor.tp_rewrite` (which needs an fx trace) is not needed.
"""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from executor.errors import ExecutorError
from planner.model_profile import ShardStyle, TensorParallelSpec
from profiler.hf import is_hf_model, is_hf_module

log = logging.getLogger(__name__)

__all__ = ["apply_hf_tp", "is_hf_model", "runs_on_shards_unchanged"]


def runs_on_shards_unchanged(layer: nn.Module, spec: TensorParallelSpec) -> bool:
    """Whether `layer` is a transformers module with only plain colwise / rowwise shards (see the module docstring)."""
    return is_hf_module(layer) and all(
        s.style in (ShardStyle.COLWISE, ShardStyle.ROWWISE) and not s.segments for s in spec.shards
    )


def apply_hf_tp(layer: nn.Module, layer_name: str, spec: TensorParallelSpec, tp_mesh: DeviceMesh) -> None:
    """Shard a transformers layer's Linears as the profile lists them, after checking every key names an
    `nn.Linear` whose split the TP degree divides (`parallelize_module` would only warn and leave it whole)."""
    degree = tp_mesh.size()
    if spec.divisor % degree:
        raise ExecutorError(
            f"layer '{layer_name}': tensor-parallel degree {degree} does not divide {spec.divisor} (its key/value "
            "heads); choose a plan with a tp degree that divides it"
        )
    plan = {}
    for shard in spec.shards:
        try:
            sub = layer.get_submodule(shard.module)
        except AttributeError:
            raise ExecutorError(f"layer '{layer_name}': the plan shards '{shard.module}' but the layer has no such "
                                "submodule; re-profile and re-plan the model") from None
        if not isinstance(sub, nn.Linear):
            raise ExecutorError(f"layer '{layer_name}': '{shard.module}' is a {type(sub).__name__}, tensor "
                                "parallelism shards only nn.Linear; re-profile the model")
        colwise = shard.style == ShardStyle.COLWISE
        split = sub.out_features if colwise else sub.in_features
        if split % degree:
            raise ExecutorError(f"layer '{layer_name}': '{shard.module}' has {split} features to split "
                                f"{shard.style.value}, not divisible by tp={degree}; plan a tp degree that divides it")
        plan[shard.module] = ColwiseParallel() if colwise else RowwiseParallel()
    parallelize_module(layer, tp_mesh, plan)
    log.info("layer '%s': %d Linears sharded over tp=%d (transformers plan)", layer_name, len(plan), degree)
