"""The `apply_*` functions: each changes modules in place to add one kind of parallelism or recomputation.

Order matters and follows torchtitan: tensor parallel, then activation checkpointing, then data parallel (FSDP2 or
the FSDP2-based composable `replicate`), all while parameters are still on the meta device; plain DDP is the one
exception and wraps an already materialised model.

ZeRO stages map onto FSDP2 like this (FSDP2 has no optimizer-only sharding):
- 0: replicated parameters. DDP when the model is neither pipelined nor tensor-parallel (fastest, and DDP cannot wrap
  a pipeline stage or DTensor parameters); otherwise the composable `replicate`.
- 1 and 2: `fully_shard(reshard_after_forward=False)` - gradients and optimizer state sharded, parameters gathered
  once per step and kept until backward ends. Stage 1 therefore also shards gradients (uses no more memory than
  planned).
- 3: `fully_shard(reshard_after_forward=True)` - parameters are freed after each layer's forward and gathered again
  for backward.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from executor.errors import ExecutorError
from planner.model_profile import ShardStyle, TensorParallelSpec
from planner.strategy import Recompute, ZeroStage

log = logging.getLogger(__name__)


def apply_tp(layer: nn.Module, layer_name: str, spec: TensorParallelSpec, tp_mesh: DeviceMesh) -> None:
    """Shard the Linears the profile listed for this layer Megatron-style (colwise feeding rowwise).

    Every planned key must name an `nn.Linear` whose split dimension the TP degree divides; `parallelize_module`
    itself would only warn about a key that matches nothing and leave the layer silently unsharded.
    """
    degree = tp_mesh.size()
    if spec.divisor % degree:
        raise ExecutorError(
            f"layer '{layer_name}': tensor-parallel degree {degree} does not divide {spec.divisor} (its attention "
            "heads); choose a plan with a tp degree that divides it"
        )
    plan = {}
    for shard in spec.shards:
        try:
            sub = layer.get_submodule(shard.module)
        except AttributeError:
            raise ExecutorError(
                f"layer '{layer_name}': the plan shards '{shard.module}' but the layer has no such submodule; the "
                "plan was made for a different model - re-profile and re-plan it"
            ) from None
        if not isinstance(sub, nn.Linear):
            raise ExecutorError(
                f"layer '{layer_name}': '{shard.module}' is a {type(sub).__name__}, tensor parallelism shards only "
                "nn.Linear; re-profile the model"
            )
        split = sub.out_features if shard.style == ShardStyle.COLWISE else sub.in_features
        if split % degree:
            raise ExecutorError(
                f"layer '{layer_name}': '{shard.module}' has {split} features to split {shard.style.value}, not "
                f"divisible by tp={degree}"
            )
        plan[shard.module] = ColwiseParallel() if shard.style == ShardStyle.COLWISE else RowwiseParallel()
    parallelize_module(layer, tp_mesh, plan)


def _attention_ops() -> set:
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    return {getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)}


def _recompute_attention_only(attention_ops: set, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # Selective recomputation (Korthikanti et al.): drop what attention keeps, keep everything else.
    return CheckpointPolicy.MUST_RECOMPUTE if op in attention_ops else CheckpointPolicy.PREFER_SAVE


def apply_ac(layers: Sequence[nn.Module], recompute: Recompute) -> None:
    """Activation checkpointing on each layer: whole layers for `full`, the attention core for `selective`.

    Uses the composable `checkpoint`, which keeps parameter names unchanged (checkpoints and initial values are
    keyed by name).
    """
    if recompute == Recompute.NONE:
        return
    context_fn = None
    if recompute == Recompute.SELECTIVE:
        policy = functools.partial(_recompute_attention_only, _attention_ops())
        context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    for layer in layers:
        if context_fn is None:
            composable_checkpoint(layer)
        else:
            composable_checkpoint(layer, context_fn=context_fn)


def apply_fsdp(
    root: nn.Module, layers: Sequence[nn.Module], dp_mesh: DeviceMesh, zero_stage: ZeroStage
) -> None:
    """FSDP2 `fully_shard` on each layer, then on the root, over the data-parallel mesh axis (see module docs)."""
    reshard = zero_stage >= ZeroStage.FULL
    for layer in layers:
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard)
    # The root's own parameters are used last in forward and first in backward: keeping them is free.
    fully_shard(root, mesh=dp_mesh, reshard_after_forward=False)


def apply_replicate(root: nn.Module, layers: Sequence[nn.Module], dp_mesh: DeviceMesh) -> None:
    """The composable `replicate` (DDP semantics on FSDP2 machinery) per layer and on the root.

    Per-layer units let each layer's gradient all-reduce start while earlier layers still run backward.
    """
    for layer in layers:
        replicate(layer, mesh=dp_mesh)
    replicate(root, mesh=dp_mesh)


def apply_ddp(module: nn.Module, dp_mesh: DeviceMesh, device: torch.device) -> DistributedDataParallel:
    """Classic DDP around a materialised, unpipelined, non-TP model."""
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, process_group=dp_mesh.get_group())
