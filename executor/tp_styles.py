"""Tensor-parallel styles for the weights torch's `ColwiseParallel` / `RowwiseParallel` do not take.

- transformers' `Conv1D` (GPT-2): a Linear whose weight is stored (in, out). Colwise splits the weight's dim 1 and
  the bias; rowwise splits dim 0 and keeps the bias whole. Input and output handling are torch's own (the styles
  subclass torch's, only the parameter placement differs); the module's forward runs on DTensors unchanged, with
  its global sizes (`x.view(-1, x.size(-1))`, `size()[:-1] + (nf,)`).
- Mixture-of-experts weight stacks (`profiler.hf_tp_derived.EXPERT_PLANS`, Mixtral's `MixtralExperts`): every
  expert's intermediate features split (the input stack's dim 1, the output stack's dim 2), the stacks held as
  DTensors (so initialisation, FSDP2, checkpoints and gradient clipping see their layout), the module's own forward
  run on the local shards (`profiler.hf_tp_derived.run_experts_sharded`) between Megatron's two region functions:
  inputs copied into the region (identity forward, gradients summed across the group in backward) and the output
  reduced out of it (summed in forward, identity in backward).
- Modules kept whole on every rank that run on the rank's own heads (`ShardStyle.REPLICATED`: Qwen3's and Gemma 3's
  per-head q / k norms): their parameters stay plain tensors; each rank's gradient is a partial sum over its heads,
  added across the TP group once backward has ended (`sum_partial_grads`, before clipping and the optimizer; under
  FSDP2 the local shard of the gradient, laid out alike on every TP rank).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from executor.errors import ExecutorError
from profiler.hf_tp_derived import expert_plan, run_experts_sharded

__all__ = ["Conv1DColwise", "Conv1DRowwise", "ExpertsParallel", "mark_partial_grads", "partial_grad_modules",
           "sum_partial_grads"]

#: Set on a module kept whole under TP that runs on the rank's own heads: the group its gradients are summed over.
PARTIAL_GRAD_ATTR = "_autopar_partial_grad_group"


def _place(module: nn.Module, mesh: DeviceMesh, placements: dict[str, Any], src_data_rank: int | None) -> None:
    for name, placement in placements.items():
        param = module._parameters.get(name)
        if param is None:
            continue
        module.register_parameter(name, nn.Parameter(
            distribute_tensor(param, mesh, [placement], src_data_rank=src_data_rank),
            requires_grad=param.requires_grad))


class Conv1DColwise(ColwiseParallel):
    """`ColwiseParallel` for a transformers Conv1D: weight (in, out) split on dim 1, bias split."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh,
            lambda _n, m, mesh: _place(m, mesh, {"weight": Shard(1), "bias": Shard(0)}, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class Conv1DRowwise(RowwiseParallel):
    """`RowwiseParallel` for a transformers Conv1D: weight (in, out) split on dim 0, bias whole."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.desired_input_layouts = (Shard(-1),)  # as torch's rowwise Linear: the input split on its last dim
        return distribute_module(
            module, device_mesh,
            lambda _n, m, mesh: _place(m, mesh, {"weight": Shard(0), "bias": Replicate()}, self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class _IntoRegion(torch.autograd.Function):
    """Identity in forward; the gradient (a partial sum on each rank) summed across the group in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _OutOfRegion(torch.autograd.Function):
    """The ranks' partial outputs summed in forward; the gradient reaches each partial unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return grad, None


class ExpertsParallel(ParallelStyle):
    """Expert tensor parallelism for a module of `profiler.hf_tp_derived.EXPERT_PLANS` (see the module docstring).

    A fused input stack must already carry its piece order (`executor.tp_rewrite.mark_fused`), so rank r's slice of
    dim 1 is [gate_r, up_r].
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        plan = expert_plan(module)
        if plan is None:
            raise ExecutorError(f"{type(module).__name__} is not an experts module autopar can shard; re-profile the "
                                "model")
        distribute_module(module, device_mesh,
                          lambda _n, m, mesh: _place(m, mesh, {plan.colwise: Shard(1), plan.rowwise: Shard(2)}, 0))
        group = device_mesh.get_group()
        forward = type(module).forward.__get__(module)
        module.forward = lambda *args, **kwargs: run_experts_sharded(
            forward, module, args, kwargs, enter=lambda t: _IntoRegion.apply(t, group),
            leave=lambda t: _OutOfRegion.apply(t, group), local=lambda p: p.to_local())
        return module


def mark_partial_grads(module: nn.Module, mesh: DeviceMesh) -> None:
    """Have `sum_partial_grads` add `module`'s parameter gradients across `mesh`'s group after each backward."""
    setattr(module, PARTIAL_GRAD_ATTR, mesh.get_group())


def partial_grad_modules(parts: list[nn.Module]) -> list[tuple[nn.Module, dist.ProcessGroup]]:
    """The modules `mark_partial_grads` named in `parts`, with their groups (found once, when the model is built)."""
    return [(m, getattr(m, PARTIAL_GRAD_ATTR)) for part in parts for m in part.modules()
            if getattr(m, PARTIAL_GRAD_ATTR, None) is not None]


def sum_partial_grads(modules: list[tuple[nn.Module, dist.ProcessGroup]]) -> None:
    """Sum the gradients of `partial_grad_modules` across their groups (every rank of a group calls this)."""
    from torch.distributed.tensor import DTensor

    for module, group in modules:
        for param in module.parameters(recurse=False):  # read now: FSDP2 may have swapped the parameters
            if param.grad is not None:
                grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
                dist.all_reduce(grad, group=group)
