"""Training-loop numerics: the learning-rate schedule, whole-model gradient clipping and the mixed-precision mode.

Learning rate. `LRSchedule` is a pure function of the step index: linear warmup over `warmup` steps, then constant,
or cosine / linear decay from the base rate to `min_lr` over the rest of the run. Each optimizer gets one stock
`LambdaLR` (`build_lr_schedulers`), stepped once per training step. A resumed run passes the step it resumes at and
continues the same curve: the schedule needs no state of its own, only the step count the checkpoint holds.

Clipping. `clip_grad_norm_` clips by the norm of the whole model's gradient, whatever the layout: each rank sums the
squares of its local gradient pieces, grouped by the mesh axes those pieces are sharded over (FSDP shards over `dp`,
tensor-parallel shards over `tp`, replicated pieces over neither), each group is all-reduced over its own axes, and
the total over the pipeline stages (`pp`). The copies of a parameter that a pipeline cut split across stages (tied
embeddings, see `executor.shared`) count once. torch's own `clip_grad_norm_` sums neither over pipeline stages nor,
for plain tensors, over anything.

Mixed precision (`mixed_precision`): bfloat16 / float16 compute runs as FSDP2 does it where FSDP2 or the composable
`replicate` holds the parameters (`MixedPrecisionPolicy(param_dtype, reduce_dtype=float32)`: bf16 parameters in
forward/backward, fp32 gradient reduction and fp32 master weights), and as autocast under DDP, plain pipelines,
tensor parallelism without data parallelism, and on a single device. float16 needs loss scaling (`GradScaler`), which
runs only where gradients are whole and identical on every rank (single device, DDP); elsewhere it is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor, Replicate
from torch.optim.lr_scheduler import LambdaLR

from executor.errors import ExecutorError
from planner.strategy import MeshAxis, Strategy

if TYPE_CHECKING:
    from executor.apply import ParallelModel

#: Added to the norm before dividing, as torch's `clip_grad_norm_` does.
_CLIP_EPS = 1e-6


class LRSchedule(BaseModel):
    """Learning rate as a function of the step: warmup, then constant or a decay to a floor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["constant", "cosine", "linear"] = Field(
        default="constant", description="After warmup: keep the base rate, or decay it (cosine / linear) to min_lr."
    )
    warmup: int = Field(default=0, ge=0, description="Steps of linear warmup: step s < warmup runs at (s+1)/warmup.")
    min_lr: float = Field(default=0.0, ge=0, description="Floor the decay reaches after the run's last step.")

    def lr_at(self, step: int, *, base_lr: float, total_steps: int) -> float:
        """Learning rate of step `step` (0-based) of a run of `total_steps` steps.

        Warmup: base * (step+1) / warmup. Then, with p = (step - warmup) / (total_steps - warmup) clamped to [0, 1]:
        cosine min + (base - min) * (1 + cos(pi p)) / 2, linear min + (base - min) * (1 - p), constant base.
        """
        if step < self.warmup:
            return base_lr * (step + 1) / self.warmup
        if self.kind == "constant":
            return base_lr
        progress = min(1.0, (step - self.warmup) / max(1, total_steps - self.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1 - progress
        return self.min_lr + (base_lr - self.min_lr) * shape

    def check(self, *, base_lr: float, total_steps: int) -> None:
        """Refuse a schedule that cannot run as meant over `total_steps` steps from `base_lr`."""
        if self.min_lr > base_lr:
            raise ExecutorError(
                f"--min-lr {self.min_lr:g} is above the learning rate {base_lr:g}; give a floor below --lr"
            )
        if self.warmup >= total_steps:
            raise ExecutorError(
                f"--warmup {self.warmup} is not below --steps {total_steps}: the run would never leave warmup; "
                "use fewer warmup steps"
            )


def build_lr_schedulers(
    optimizers: Sequence[torch.optim.Optimizer],
    schedule: LRSchedule,
    *,
    total_steps: int,
    start_step: int = 0,
    base_lr: float | None = None,
) -> list[LambdaLR]:
    """One `LambdaLR` per optimizer following `schedule`; step each once per training step, after `opt.step()`.

    Right after this call every group's lr is the rate of step `start_step` (the step a resumed run continues at).
    `base_lr` is the peak rate; by default each group's `initial_lr` (set by an earlier scheduler) or else its lr.
    Give it when resuming: a loaded optimizer state carries the last scheduled rate, not the peak.
    """
    schedulers = []
    for opt in optimizers:
        for group in opt.param_groups:
            peak = base_lr if base_lr is not None else group.get("initial_lr", group["lr"])
            group["initial_lr"] = peak
            group["lr"] = peak
        peaks = [g["initial_lr"] for g in opt.param_groups]
        lambdas = [_factor(schedule, start_step, total_steps, peak) for peak in peaks]
        schedulers.append(LambdaLR(opt, lambdas))
    return schedulers


def _factor(schedule: LRSchedule, start: int, total: int, peak: float) -> Callable[[int], float]:
    # LambdaLR counts its own steps from 0; the schedule is keyed by the run's step.
    return lambda i: schedule.lr_at(start + i, base_lr=peak, total_steps=total) / peak if peak else 0.0


def _trainable(pm: ParallelModel) -> Iterable[torch.Tensor]:
    """Each parameter of the model once: the copies of a split shared parameter count only under its canonical name."""
    skip: set[int] = set()
    for copies in pm.shared_copies.copies:
        for part, name in copies.local:
            if name != copies.canonical:
                skip.add(id(part.get_parameter(name)))
    for part in pm.parts:
        for p in part.parameters():
            if id(p) not in skip:
                yield p


_AXES = (MeshAxis.DP.value, MeshAxis.TP.value)


def _local_pieces(grads: Iterable[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """Local gradient tensors keyed by a bit mask of the mesh axes they are sharded over (bit i: `_AXES[i]`)."""
    out: dict[int, list[torch.Tensor]] = {}
    for g in grads:
        key = 0
        if isinstance(g, DTensor):
            if any(p.is_partial() for p in g.placements):
                g = g.redistribute(placements=[Replicate() if p.is_partial() else p for p in g.placements])
            names = g.device_mesh.mesh_dim_names or ()
            for name, placement in zip(names, g.placements):
                # Not is_shard(): FSDP over TP shards with `_StridedShard`, for which it is False.
                if not placement.is_replicate() and name in _AXES:
                    key |= 1 << _AXES.index(name)
            g = g.to_local()
        out.setdefault(key, []).append(g)
    return out


@torch.no_grad()
def grad_norm(pm: ParallelModel) -> torch.Tensor:
    """The L2 norm of the whole model's gradient, the same on every rank (collective over the mesh).

    A `GradScaler` must have unscaled the gradients first.
    """
    grads = [p.grad for p in _trainable(pm) if p.grad is not None]
    squares = torch.zeros(1 << len(_AXES), dtype=torch.float32, device=pm.device)
    for key, pieces in _local_pieces(grads).items():
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in pieces:
            by_dtype.setdefault(t.dtype, []).append(t)
        squares[key] = sum(torch.stack(torch._foreach_norm(ts)).float().square().sum() for ts in by_dtype.values())
    for bit, axis in enumerate(_AXES):
        group_size = pm.mesh[axis].size()
        if group_size == 1:
            continue
        summed = squares.clone()
        dist.all_reduce(summed, group=pm.mesh[axis].get_group())
        sharded = torch.tensor([(key >> bit) & 1 for key in range(len(squares))], dtype=torch.bool, device=pm.device)
        squares = torch.where(sharded, summed, squares)
    total = squares.sum()
    if pm.mesh[MeshAxis.PP.value].size() > 1:
        dist.all_reduce(total, group=pm.mesh[MeshAxis.PP.value].get_group())
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(pm: ParallelModel, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) with the whole model's norm; returns that norm.

    Every copy of a split shared parameter is scaled by the same coefficient, so the copies stay bit-identical.
    """
    norm = grad_norm(pm)
    coef = torch.clamp(max_norm / (norm + _CLIP_EPS), max=1.0)
    grads = [p.grad for part in pm.parts for p in part.parameters() if p.grad is not None]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    if local:
        torch._foreach_mul_(local, coef)
    return float(norm)


def mixed_precision(
    strategy: Strategy, dtype: torch.dtype | None, *, fsdp2: bool
) -> tuple[MixedPrecisionPolicy | None, torch.dtype | None]:
    """(FSDP2 policy, autocast dtype) for compute in `dtype` (None: float32) under this layout.

    `fsdp2`: whether FSDP2 `fully_shard` or the composable `replicate` holds the parameters.
    """
    if dtype is None or dtype == torch.float32:
        return None, None
    if dtype not in (torch.bfloat16, torch.float16):
        raise ExecutorError(f"compute dtype {dtype} is not supported; use float32, bfloat16 or float16")
    dims = strategy.dims
    if dtype == torch.float16 and (fsdp2 or dims.pp > 1 or dims.tp > 1):
        raise ExecutorError(
            "float16 needs loss scaling, which autopar runs only where each rank holds whole, identical gradients "
            f"(one device or DDP: pp=1, tp=1, ZeRO stage 0); this plan has pp={dims.pp} tp={dims.tp} ZeRO stage "
            f"{int(strategy.zero_stage)} with dp={dims.dp}. Use --dtype bfloat16 (no loss scaling needed)"
        )
    if fsdp2:
        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32), None
    return None, dtype


def uses_fsdp2(strategy: Strategy) -> bool:
    """Whether `apply_plan` gives the data-parallel axis to FSDP2 / `replicate` (else DDP or no data parallelism)."""
    dims = strategy.dims
    return dims.dp > 1 and not (dims.pp == 1 and dims.tp == 1 and int(strategy.zero_stage) == 0)


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward; multiplies the gradient by the loss scale in backward (the reported loss stays true)."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def loss_scaling(
    loss_fn: Callable[..., torch.Tensor] | None, device: torch.device
) -> tuple[torch.amp.GradScaler, Callable[..., torch.Tensor]]:
    """A `GradScaler` and a loss function whose backward is scaled by it (float16 under autocast).

    `loss_fn(output[, targets])`, or None for a model whose output carries its loss (see `executor.batch`). The
    returned function's value is the true loss; only its gradient is scaled. The training loop unscales
    (`scaler.unscale_(opt)`) before clipping, steps through `scaler.step(opt)` (which skips a step with inf/NaN
    gradients) and calls `scaler.update()` once per step.
    """
    from executor.batch import training_loss

    scaler = torch.amp.GradScaler(device.type)

    def scaled(output, *targets) -> torch.Tensor:
        loss = training_loss(output, targets[0] if targets else None, loss_fn)
        return _ScaleGrad.apply(loss, scaler.scale(torch.ones((), device=loss.device)))

    return scaler, scaled
