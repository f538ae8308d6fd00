"""autopar's training loop: N steps of a plan, with per-step time, loss and throughput, and the run report.

A step: forward and backward (`ParallelModel.forward_backward`), then float16 unscaling, clipping by the whole
model's gradient norm, the optimizer and LR-scheduler steps (see `executor.optim`). Rank 0 logs each step and, with
`tensorboard_dir`, writes `train/loss`, `train/lr`, `train/step_seconds`, `train/tokens_per_second` and
`train/grad_norm` as TensorBoard scalars (x axis: the step index).

The report sets what was measured next to what the plan predicted: median step time (first step excluded, it pays
for warm-up) and each rank's peak memory against the prediction for its pipeline rank. On CUDA peak memory is
`torch.cuda.max_memory_allocated`; on CPU it is the process's peak private resident memory (anonymous pages plus
shared memory: tensors, the Python heap, thread stacks, gloo's buffers), read as the kernel's peak RSS (VmHWM) less
the file-backed pages (RssFile: torch's shared-library code paged in as new code paths first run, shared with every
other process and dropped under memory pressure, so no part of what training holds). Code pages keep arriving
during the first step, so after it the peak is folded into a carried maximum and the kernel's peak restarted
(`restart_peak_window`): later steps' peaks are exact, the first step's is its peak less the code it paged in.
"""

from __future__ import annotations

import importlib
import logging
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch.optim.lr_scheduler import LRScheduler

from executor import optim
from executor.apply import ParallelModel
from executor.errors import ExecutorError, LossDiverged
from planner.strategy import MeshAxis, Plan

log = logging.getLogger(__name__)

#: (step, global batch size) -> (inputs, targets) of the whole global batch for that step.
#: Inputs are a tuple, a dict (keyword inputs) or one tensor; targets None when the model computes its own loss.
DataSource = Callable[[int, int], tuple[Any, Any]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepRecord(_Strict):
    """One measured training step."""

    step: int = Field(ge=0, description="Step index (0-based; a resumed run continues the count).")
    loss: float = Field(description="Mean loss over the global batch.")
    seconds: float = Field(ge=0, description="Wall time of the step on rank 0, ending at the loss all-reduce.")
    cpu_seconds: float = Field(
        default=0.0, ge=0, description="CPU time rank 0's process used in the step (insensitive to other load)."
    )
    tokens_per_second: float = Field(ge=0, description="Global tokens (or samples) processed per second.")
    lr: float | None = Field(default=None, description="Learning rate the step ran with (first param group).")
    grad_norm: float | None = Field(
        default=None, description="Whole-model gradient norm before clipping (when clipping or TensorBoard is on)."
    )


class RankMemory(_Strict):
    """Peak memory of one rank against the plan's prediction for its pipeline rank."""

    rank: int = Field(ge=0)
    pp_rank: int = Field(ge=0)
    peak_bytes: int = Field(ge=0, description="Measured peak (see memory_kind).")
    start_bytes: int = Field(
        default=0, ge=0, description="Same measure taken before the model was built (interpreter, torch, buffers)."
    )
    predicted_bytes: float | None = Field(default=None, description="Plan's predicted peak, when a plan was given.")


class RunReport(_Strict):
    """What a run measured, next to what the plan predicted."""

    strategy: str = Field(description="Strategy.describe() of the plan that ran.")
    world_size: int = Field(ge=1)
    device_type: str
    global_batch_size: int = Field(ge=1)
    tokens_per_sample: int = Field(ge=1)
    steps: list[StepRecord]
    measured_step_seconds: float | None = Field(description="Median step time, first step excluded when possible.")
    predicted_step_seconds: float | None = Field(default=None)
    memory_kind: Literal["cuda_max_allocated", "cpu_peak_rss", "cpu_peak_private"] = Field(
        description="cuda_max_allocated; cpu_peak_private (peak private RSS, the module docstring); cpu_peak_rss in "
                    "reports written before it (peak RSS with torch's code pages)."
    )
    memory: list[RankMemory]
    diverged_at_step: int | None = Field(
        default=None, description="Step at which the loss (or the training state) became NaN/inf; the run stopped."
    )

    @property
    def step_time_ratio(self) -> float | None:
        """Measured over predicted step time."""
        if not self.measured_step_seconds or not self.predicted_step_seconds:
            return None
        return self.measured_step_seconds / self.predicted_step_seconds


#: Peak private bytes of the windows closed by `restart_peak_window` (CPU: the kernel keeps one peak per process).
_carried_peak = [0]


def _proc_status() -> dict[str, int]:
    """VmRSS, VmHWM and RssFile of this process in bytes (empty where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def current_memory_bytes(device: torch.device) -> int:
    """Memory in use now, by the same measure as `peak_memory_bytes` (0 where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    st = _proc_status()
    if "VmRSS" in st and "RssFile" in st:
        return st["VmRSS"] - st["RssFile"]
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on its device (see the module docstring for what CPU measures)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    st = _proc_status()
    if "VmHWM" in st and "RssFile" in st:
        return max(_carried_peak[0], st["VmHWM"] - st["RssFile"])
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def restart_peak_window(device: torch.device, *, keep: bool = True) -> None:
    """CPU: fold the peak so far into the carried maximum (`keep=False`: forget it) and restart the kernel's peak RSS
    (`/proc/self/clear_refs` 5), so code pages paged in before now stop blurring later peaks. No-op on CUDA."""
    if device.type == "cuda":
        return
    _carried_peak[0] = max(_carried_peak[0], peak_memory_bytes(device)) if keep else 0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not permitted: the kernel's peak then spans the whole run
        pass


def check_tensorboard() -> None:
    """Raise an `ExecutorError` naming the fix when the tensorboard package is missing (`--tensorboard` needs it)."""
    try:
        importlib.import_module("tensorboard")
        importlib.import_module("torch.utils.tensorboard")
    except ImportError:
        raise ExecutorError(
            "--tensorboard needs the tensorboard package, which is not installed here; pip install tensorboard "
            "(or pip install 'autopar[tensorboard]'), or drop --tensorboard"
        ) from None


def tensorboard_writer(log_dir: str | Path, *, start_step: int = 0):
    """A `torch.utils.tensorboard.SummaryWriter` writing event files into `log_dir`.

    A run resumed at `start_step` > 0 has TensorBoard drop what earlier event files hold from that step on (a run
    that went further than its last checkpoint would otherwise leave two curves over those steps).
    """
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(log_dir), flush_secs=10, purge_step=start_step or None)


def _write_scalars(writer, rec: StepRecord) -> None:
    values = {"loss": rec.loss, "lr": rec.lr, "step_seconds": rec.seconds,
              "tokens_per_second": rec.tokens_per_second, "grad_norm": rec.grad_norm}
    for name, value in values.items():
        if value is not None:
            writer.add_scalar(f"train/{name}", value, rec.step)


def _optimizer_step(
    pm: ParallelModel, optimizers: Sequence[torch.optim.Optimizer], schedulers: Sequence[LRScheduler],
    clip_grad: float | None, want_norm: bool,
) -> float | None:
    """Unscale (float16), clip, step and zero the optimizers, step the schedulers; the gradient norm if computed."""
    scaler = pm.grad_scaler
    if scaler is not None:
        for opt in optimizers:
            scaler.unscale_(opt)
    norm = None
    if clip_grad is not None:
        norm = optim.clip_grad_norm_(pm, clip_grad)
    elif want_norm:
        norm = float(optim.grad_norm(pm))
    for opt in optimizers:
        if scaler is not None:
            scaler.step(opt)  # skipped when the unscaled gradients hold inf/NaN
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.update()
    for sched in schedulers:
        sched.step()
    return norm


def train(
    pm: ParallelModel,
    optimizers: Sequence[torch.optim.Optimizer],
    data: DataSource,
    *,
    steps: int,
    start_step: int = 0,
    tokens_per_sample: int = 1,
    on_step_end: Callable[[int], None] | None = None,
    schedulers: Sequence[LRScheduler] = (),
    clip_grad: float | None = None,
    tensorboard_dir: str | Path | None = None,
) -> list[StepRecord]:
    """Run steps [start_step, steps); `on_step_end(steps_done)` runs after each (checkpointing hooks in there).

    Each step: forward and backward, then (float16: unscale through `pm.grad_scaler`) clip to `clip_grad` by the
    whole model's gradient norm (`executor.optim.clip_grad_norm_`), the optimizer steps, and each scheduler
    (`executor.optim.build_lr_schedulers`) steps once. With `tensorboard_dir` rank 0 writes loss, lr, step time,
    tokens/s and gradient norm per step there; pass the same arguments on every rank (the norm is a collective).
    Every rank returns the same records (the loss is all-reduced; times are rank 0's).
    """
    if clip_grad is not None and clip_grad <= 0:
        raise ExecutorError(f"clip_grad must be positive, got {clip_grad}; pass a max norm such as 1.0 or None")
    records = []
    gbs = pm.strategy.global_batch_size
    writer = None
    if tensorboard_dir is not None and dist.get_rank() == 0:
        writer = tensorboard_writer(tensorboard_dir, start_step=start_step)
    try:
        for step in range(start_step, steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            local = pm.forward_backward(pm.local_batch(*data(step, gbs)))
            lr = optimizers[0].param_groups[0]["lr"] if optimizers else None
            norm = _optimizer_step(pm, optimizers, schedulers, clip_grad, tensorboard_dir is not None)
            if step == start_step:  # the first step has paged in the code every later step runs
                restart_peak_window(pm.device)
            loss = pm.global_loss(local)  # also lines the ranks up, so the time covers the slowest one
            if not math.isfinite(loss):  # every rank sees the same all-reduced value: all stop here, unsaved
                raise LossDiverged(step, loss)
            if pm.device.type == "cuda":
                torch.cuda.synchronize(pm.device)
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            rec = StepRecord(step=step, loss=loss, seconds=seconds, cpu_seconds=cpu,
                             tokens_per_second=gbs * tokens_per_sample / seconds, lr=lr, grad_norm=norm)
            records.append(rec)
            log.info("step %d  loss %.5f  %.1f ms  %.0f tokens/s%s%s", step, loss, seconds * 1e3,
                     rec.tokens_per_second, "" if lr is None else f"  lr {lr:.3g}",
                     "" if norm is None else f"  grad norm {norm:.4g}")
            if writer is not None:
                _write_scalars(writer, rec)
            if on_step_end is not None:
                on_step_end(step + 1)
    except ExecutorError as exc:
        exc.records = list(records)  # the steps done before it stopped, for the run report
        raise
    finally:
        if writer is not None:
            writer.close()
    return records


def build_report(
    pm: ParallelModel, records: Sequence[StepRecord], plan: Plan | None, tokens_per_sample: int, *,
    start_bytes: int = 0,
) -> RunReport:
    """Gather every rank's peak memory (collective: call on all ranks) and assemble the report.

    `start_bytes`: this rank's `current_memory_bytes` before the model was built.
    """
    pp_rank = pm.mesh[MeshAxis.PP.value].get_local_rank()
    mine = (dist.get_rank(), pp_rank, peak_memory_bytes(pm.device), start_bytes)
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    predicted_mem = plan.prediction.memory if plan is not None else None
    memory = [
        RankMemory(
            rank=r, pp_rank=p, peak_bytes=b, start_bytes=s,
            predicted_bytes=predicted_mem[p].total if predicted_mem and p < len(predicted_mem) else None,
        )
        for r, p, b, s in everyone
    ]
    times = [r.seconds for r in records]
    measured = statistics.median(times[1:] if len(times) > 1 else times) if times else None
    return RunReport(
        strategy=pm.strategy.describe(),
        world_size=pm.strategy.dims.world_size,
        device_type=pm.device.type,
        global_batch_size=pm.strategy.global_batch_size,
        tokens_per_sample=tokens_per_sample,
        steps=list(records),
        measured_step_seconds=measured,
        predicted_step_seconds=plan.prediction.step_seconds if plan is not None else None,
        memory_kind="cuda_max_allocated" if pm.device.type == "cuda" else "cpu_peak_private",
        memory=memory,
    )
