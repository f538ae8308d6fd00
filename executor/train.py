"""autopar's training loop: N steps of a plan, with per-step time, loss and throughput, and the run report.

The report sets what was measured next to what the plan predicted: median step time (first step excluded, it pays
for warm-up) and each rank's peak memory against the prediction for its pipeline rank. On CUDA peak memory is
`torch.cuda.max_memory_allocated`; on CPU it is the process's peak resident set size, which also counts the Python
interpreter and torch itself, so it is an upper bound on what the plan's memory model describes.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from executor.apply import ParallelModel
from planner.strategy import MeshAxis, Plan

log = logging.getLogger(__name__)

#: (step, global batch size) -> (inputs, targets) of the whole global batch for that step.
DataSource = Callable[[int, int], tuple[tuple[torch.Tensor, ...], torch.Tensor]]


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
    memory_kind: Literal["cuda_max_allocated", "cpu_peak_rss"]
    memory: list[RankMemory]

    @property
    def step_time_ratio(self) -> float | None:
        """Measured over predicted step time."""
        if not self.measured_step_seconds or not self.predicted_step_seconds:
            return None
        return self.measured_step_seconds / self.predicted_step_seconds


def current_memory_bytes(device: torch.device) -> int:
    """Memory in use now, by the same measure as `peak_memory_bytes` (0 where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process on its device (see the module docstring for what CPU measures)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def train(
    pm: ParallelModel,
    optimizers: Sequence[torch.optim.Optimizer],
    data: DataSource,
    *,
    steps: int,
    start_step: int = 0,
    tokens_per_sample: int = 1,
    on_step_end: Callable[[int], None] | None = None,
) -> list[StepRecord]:
    """Run steps [start_step, steps); `on_step_end(steps_done)` runs after each (checkpointing hooks in there).

    Every rank returns the same records (the loss is all-reduced; times are rank 0's).
    """
    records = []
    gbs = pm.strategy.global_batch_size
    for step in range(start_step, steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        inputs, targets = pm.local_batch(*data(step, gbs))
        local = pm.forward_backward(inputs, targets)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss = pm.global_loss(local)  # also lines the ranks up, so the time covers the slowest one
        if pm.device.type == "cuda":
            torch.cuda.synchronize(pm.device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        rec = StepRecord(step=step, loss=loss, seconds=seconds, cpu_seconds=cpu,
                         tokens_per_second=gbs * tokens_per_sample / seconds)
        records.append(rec)
        log.info("step %d  loss %.5f  %.1f ms  %.0f tokens/s", step, loss, seconds * 1e3, rec.tokens_per_second)
        if on_step_end is not None:
            on_step_end(step + 1)
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
        memory_kind="cuda_max_allocated" if pm.device.type == "cuda" else "cpu_peak_rss",
        memory=memory,
    )
