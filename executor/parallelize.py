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

Under FSDP2 / `replicate` a reduced-precision `MixedPrecisionPolicy` applies to every unit except BatchNorm layers,
which keep fp32 parameters. BatchNorm under data parallelism: `apply_batchnorm_policy` either synchronises the
statistics over the dp axis (`SyncedBatchNorm`: torch's SyncBatchNorm on CUDA, all-reduces over gloo on the CPU) or
warns, naming the layers.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable import checkpoint as composable_checkpoint
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from executor.errors import ExecutorError
from executor.tp_rewrite import localize_layer, mark_fused
from executor.tp_styles import Conv1DColwise, Conv1DRowwise, ExpertsParallel, mark_partial_grads
from executor.vocab_parallel import check_vocab_module
from planner.model_profile import ShardStyle, TensorParallelSpec, TPShard
from planner.strategy import Recompute, ZeroStage
from profiler.hf_tp_derived import expert_plan, is_conv1d, linear_features
from profiler.recording import LayerCall

log = logging.getLogger(__name__)


def apply_tp(
    layer: nn.Module, layer_name: str, spec: TensorParallelSpec, tp_mesh: DeviceMesh, *,
    example_call: LayerCall | None = None, localize: bool = True, sequence_parallel: bool = False,
) -> None:
    """Shard the Linears the profile listed for this layer Megatron-style (colwise feeding rowwise).

    Every planned key must name an `nn.Linear` whose split dimension the TP degree divides; `parallelize_module`
    itself would only warn about a key that matches nothing and leave the layer silently unsharded. With `localize`
    the layer's forward is first made to run on local shards (`executor.tp_rewrite.localize_layer`, which needs the
    layer's `example_call` from `tp_rewrite.record_tp_calls`): fused projections permuted, hard-coded sizes made
    local. Without it the forward must infer local sizes itself (transformers' layers, `executor.hf_tp`).

    `sequence_parallel` (the spec must allow it): the layer takes and returns local sequence shards (dim 1), as
    torchtitan plans it: `SequenceParallel()` on its norms, each TP region's input gathered by
    `PrepareModuleInput(Shard(1) -> Replicate())` (kept a DTensor, so the region's colwise input gradients add up
    as partial sums and are reduce-scattered once), rowwise outputs reduce-scattered (`output_layouts=Shard(1)`).
    """
    degree = tp_mesh.size()
    if not spec.allows(degree):
        raise ExecutorError(
            f"layer '{layer_name}': tensor-parallel degree {degree} does not divide {spec.divisor} (its attention "
            "or key/value heads); choose a plan with a tp degree that divides it"
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
        if shard.style == ShardStyle.REPLICATED:  # whole on every rank; gradients summed after backward
            mark_partial_grads(sub, tp_mesh)
            continue
        if shard.style == ShardStyle.EXPERTS:
            experts = expert_plan(sub)
            split = None if experts is None else getattr(sub, experts.rowwise).shape[2]
            what = "an experts module autopar can shard"
        else:
            features = linear_features(sub)
            split = None if features is None else features[1] if shard.style == ShardStyle.COLWISE else features[0]
            what = "an nn.Linear (or transformers Conv1D)"
        if split is None:
            raise ExecutorError(
                f"layer '{layer_name}': '{shard.module}' is a {type(sub).__name__}, not {what} as the plan's "
                f"{shard.style.value} shard says; re-profile the model"
            )
        if split % degree:
            raise ExecutorError(
                f"layer '{layer_name}': '{shard.module}' has {split} features to split {shard.style.value}, not "
                f"divisible by tp={degree}; plan a tp degree that divides it"
            )
        if shard.style == ShardStyle.EXPERTS:
            plan[shard.module] = ExpertsParallel()
        elif is_conv1d(sub):
            plan[shard.module] = Conv1DColwise() if shard.style == ShardStyle.COLWISE else Conv1DRowwise()
        else:
            plan[shard.module] = ColwiseParallel() if shard.style == ShardStyle.COLWISE else RowwiseParallel()
    sp = spec.sequence_parallel if sequence_parallel else None
    if sequence_parallel and sp is None:
        raise ExecutorError(f"layer '{layer_name}': the profile does not mark it sequence-parallel; plan without "
                            "sequence parallelism or re-profile the model")
    if sp is not None:
        if any(shard.style in (ShardStyle.EXPERTS, ShardStyle.REPLICATED)
               or isinstance(plan[shard.module], (Conv1DColwise, Conv1DRowwise)) for shard in spec.shards):
            raise ExecutorError(f"layer '{layer_name}': sequence parallelism runs only nn.Linear shards; plan without "
                                "sequence parallelism")
        for shard in spec.shards:
            if shard.style == ShardStyle.ROWWISE:
                plan[shard.module] = RowwiseParallel(output_layouts=Shard(1))
        for path in sp.norms:
            plan[path] = SequenceParallel(use_local_output=True)
        for path in sp.regions:
            plan[path] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
        missing = [p for p in [*sp.norms, *sp.regions] if not _has_submodule(layer, p)]
        if missing:
            raise ExecutorError(f"layer '{layer_name}' has no submodule '{missing[0]}' the profile runs "
                                "sequence-parallel; re-profile the model")
    if not localize:
        mark_fused(layer, layer_name, spec, degree)
    else:
        localize_layer(layer, layer_name, spec, example_call, degree)
        if sp is not None and "forward" in vars(layer):  # the rewritten forward calls past the regions' hooks
            raise ExecutorError(f"layer '{layer_name}': its forward had to be rewritten for tensor parallelism, which "
                                "sequence parallelism cannot wrap; plan without sequence parallelism")
    parallelize_module(layer, tp_mesh, plan)


def _has_submodule(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def apply_vocab_parallel(
    layer: nn.Module, layer_name: str, shards: Sequence[TPShard], tp_mesh: DeviceMesh, *, split_logits: bool
) -> None:
    """Vocabulary-parallel embedding and head (see `executor.vocab_parallel`), sharded over `tp_mesh`.

    `vocab_rowwise` (an nn.Embedding): rows split, replicated ids in, the output all-reduced whole.
    `vocab_colwise` (the head's nn.Linear): outputs split; with `split_logits` the logits stay a DTensor split over
    the vocabulary (the loss must run under `loss_parallel`), else they are gathered into a plain whole tensor.
    Uneven splits are fine (DTensor gives the first ranks one row more).
    """
    for shard in shards:
        check_vocab_module(layer, layer_name, shard, tp_mesh.size())
        if shard.style == ShardStyle.VOCAB_ROWWISE:
            style = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        elif split_logits:
            style = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        else:
            style = ColwiseParallel(output_layouts=Replicate())
        # A layer that is itself the Embedding / Linear (path '') takes the style directly.
        parallelize_module(layer, tp_mesh, style if not shard.module else {shard.module: style})


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
    root: nn.Module, layers: Sequence[nn.Module], dp_mesh: DeviceMesh, zero_stage: ZeroStage,
    mp_policy: MixedPrecisionPolicy | None = None,
) -> None:
    """FSDP2 `fully_shard` on each layer, then on the root, over the data-parallel mesh axis (see module docs).

    `mp_policy`: FSDP2 mixed precision (e.g. bf16 parameters in compute, fp32 gradient reduction); None: fp32.
    BatchNorm layers then become units of their own that keep fp32 parameters (see `_fp32_batchnorms`).
    """
    reshard = zero_stage >= ZeroStage.FULL
    mp = mp_policy or MixedPrecisionPolicy()
    for bn in _fp32_batchnorms(root, layers, mp):
        fully_shard(bn, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=_fp32_params(mp))
    for layer in layers:
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=reshard, mp_policy=mp)
    # The root's own parameters are used last in forward and first in backward: keeping them is free.
    fully_shard(root, mesh=dp_mesh, reshard_after_forward=False, mp_policy=mp)


def apply_replicate(
    root: nn.Module, layers: Sequence[nn.Module], dp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None
) -> None:
    """The composable `replicate` (DDP semantics on FSDP2 machinery) per layer and on the root.

    Per-layer units let each layer's gradient all-reduce start while earlier layers still run backward.
    `mp_policy` as for `apply_fsdp`.
    """
    mp = mp_policy or MixedPrecisionPolicy()
    for bn in _fp32_batchnorms(root, layers, mp):
        replicate(bn, mesh=dp_mesh, mp_policy=_fp32_params(mp))
    for layer in layers:
        replicate(layer, mesh=dp_mesh, mp_policy=mp)
    replicate(root, mesh=dp_mesh, mp_policy=mp)


def _fp32_batchnorms(root: nn.Module, layers: Sequence[nn.Module], mp: MixedPrecisionPolicy) -> list[nn.Module]:
    """BatchNorm layers to keep in fp32 under a reduced-precision policy.

    BatchNorm's running statistics are fp32 buffers, which FSDP2 does not cast; torch's batch_norm refuses bf16
    weights with fp32 statistics but takes a bf16 input with fp32 weights and statistics (as under autocast).
    """
    if mp.param_dtype is None or mp.param_dtype == torch.float32:
        return []
    units = {id(layer) for layer in layers}
    return [m for m in root.modules() if isinstance(m, _BatchNorm) and id(m) not in units and m is not root]


def _fp32_params(mp: MixedPrecisionPolicy) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=mp.reduce_dtype, output_dtype=mp.param_dtype,
                                cast_forward_inputs=False)


def apply_ddp(module: nn.Module, dp_mesh: DeviceMesh, device: torch.device) -> DistributedDataParallel:
    """Classic DDP around a materialised, unpipelined, non-TP model.

    Gradients are views into DDP's all-reduce buckets (`gradient_as_bucket_view`), so they are held once, not twice
    (the planner counts 4 bytes of gradient per parameter).
    """
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, process_group=dp_mesh.get_group(),
                                   gradient_as_bucket_view=True)


class SyncedBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics (mean, variance) span a data-parallel group, as one process would see them.

    Not built directly: `apply_sync_batchnorm` changes an existing layer's class to a subclass of this and of the
    layer's own class, so the layer keeps its parameters, buffers, names (checkpoints and init are keyed by name) and
    `isinstance` checks (an `nn.BatchNorm2d` stays one). On CUDA it runs torch's `nn.SyncBatchNorm` forward; on the
    CPU, where torch's refuses, two differentiable all-reduces over the group (sum and count, then the sum of squared
    deviations). Evaluation mode, or a group of one, is plain BatchNorm.
    """

    #: The data-parallel group the statistics are reduced over (set by `apply_sync_batchnorm`).
    process_group: dist.ProcessGroup | None = None

    _check_non_zero_input_channels = nn.SyncBatchNorm._check_non_zero_input_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """BatchNorm with statistics over the whole group's batch in training mode."""
        group = self.process_group
        if not self.training or group is None or dist.get_world_size(group) == 1:
            return super().forward(input)
        if input.device.type != "cpu":
            return nn.SyncBatchNorm.forward(self, input)
        return self._forward_gloo(input, group)

    def _forward_gloo(self, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm does
                factor = 1.0 / float(self.num_batches_tracked)
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.full((1,), x.numel() // x.size(1), dtype=torch.float32, device=x.device)
        # Differentiable all-reduces: every rank's output depends on every rank's input, and backward sums the
        # gradients flowing into the shared statistics over the group, as in one process.
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), count]), group)
        n = stats[-1]
        mean = stats[:-1] / n
        centered = xf - mean.view(shape)
        var = _AllReduceSum.apply(centered.square().sum(dims), group) / n  # biased, for normalising
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.float().view(shape)
        if self.bias is not None:
            out = out + self.bias.float().view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                unbiased = var * (n / (n - 1)) if n > 1 else var
                self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                self.running_var.mul_(1 - factor).add_(unbiased.detach().to(self.running_var.dtype), alpha=factor)
        return out.to(x.dtype)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group; backward sums the incoming gradients over the group as well."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=ctx.group)
        return out, None


_SYNCED_CLASSES: dict[type, type] = {}


def _synced_class(cls: type) -> type:
    if issubclass(cls, SyncedBatchNorm):
        return cls
    if cls not in _SYNCED_CLASSES:
        _SYNCED_CLASSES[cls] = type(f"Synced{cls.__name__}", (SyncedBatchNorm, cls), {})
    return _SYNCED_CLASSES[cls]


def batchnorm_layers(module: nn.Module) -> list[str]:
    """Names of the BatchNorm layers (`_BatchNorm` subclasses) inside `module`."""
    return [name for name, m in module.named_modules() if isinstance(m, _BatchNorm)]


def apply_sync_batchnorm(module: nn.Module, group: dist.ProcessGroup) -> list[str]:
    """Make every BatchNorm layer of `module` take its training statistics over `group`, in place; their names.

    Works on the meta device (before materialising or sharding) and keeps every parameter and buffer name.
    """
    names = batchnorm_layers(module)
    for name in names:
        layer = module.get_submodule(name)
        layer.__class__ = _synced_class(type(layer))
        layer.process_group = group
    return names


def apply_batchnorm_policy(parts: Sequence[nn.Module], dp_mesh: DeviceMesh, *, sync: bool) -> None:
    """Under data parallelism: synchronise BatchNorm statistics over the dp axis (`sync`), or warn naming the layers.

    Without synchronisation each replica normalises with the statistics of its own share of the batch, so training
    differs from a single-process run of the same global batch (and the running statistics are rank 0's under DDP).
    """
    if dp_mesh.size() == 1:
        return
    if sync:
        for part in parts:
            names = apply_sync_batchnorm(part, dp_mesh.get_group())
            if names:
                log.info("synchronised BatchNorm over dp=%d: %s", dp_mesh.size(), ", ".join(names))
        return
    names = [n for part in parts for n in batchnorm_layers(part)]
    if names and dp_mesh.get_local_rank() == 0:
        log.warning(
            "BatchNorm layers %s normalise with per-replica statistics under dp=%d, so training differs from a "
            "single-process run of the same global batch; pass --sync-batchnorm (apply_plan(sync_batchnorm=True)) "
            "to synchronise them", ", ".join(names), dp_mesh.size(),
        )
