"""Data-parallel communication of one configuration, as autopar's executor runs it: one home for every DP term.

Each term is a per-layer cost `alpha + beta * elements` (seconds; `elements`: the layer's parameter elements on one
device), so a pipeline rank's cost is a prefix-sum difference: the float evaluation (`planner.candidate`), the
lower bound (`planner.enumerate`) and the CP-SAT model (`planner.stages`) all read the same per-layer values.

What the executor does (`executor.parallelize`, `executor.apply`; torch 2.x FSDP2 and pipelining):
- ZeRO 0, no pipeline: DDP all-reduces fp32 gradients once per step in 25 MiB buckets while the last micro-batch's
  backward runs; each bucket pays a collective's latency and the last bucket can never be hidden.
- ZeRO 0 in a pipeline (composable `replicate`): the all-reduce of each layer's gradients runs after the schedule
  (`PipelineStage.perform_reduce_grad`), exposed.
- ZeRO 1 (`fully_shard(reshard_after_forward=False)`, gradient sync on the last micro-batch only): the parameters
  are all-gathered once per step before the first forward (exposed) and the gradients reduce-scattered once, during
  the last backward.
- ZeRO 2, no pipeline: as ZeRO 1, but the gradients are reduce-scattered after every micro-batch (so they stay
  sharded between micro-batches, as planned).
- ZeRO 3, no pipeline: each layer's parameters are all-gathered before its forward and again before its backward,
  and its gradients reduce-scattered after its backward, every micro-batch; FSDP2 prefetches the next layer, so these
  overlap compute when `overlap_dp_comm`.
- ZeRO 2 and 3 in a pipeline: torch's schedule defers the gradient sync to after the last micro-batch (exposed) and
  keeps parameters unsharded after backward; ZeRO 3 gathers once per micro-batch (for backward) plus once more.
Gradients are reduced in fp32 (autopar's mixed precision keeps fp32 gradients); parameters are gathered in the
compute dtype. Every collective of a layer is one call (FSDP2 flattens a layer's parameters into one buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cost import CommModel, Group
from planner.model_profile import DType
from planner.strategy import ZeroStage

#: DDP's default gradient bucket (torch.nn.parallel.DistributedDataParallel, bucket_cap_mb=25).
DDP_BUCKET_BYTES = 25 * 1024**2
#: Bytes per element of a reduced gradient: autopar keeps fp32 gradients (fp32 training, or mixed precision with
#: `MixedPrecisionPolicy(reduce_dtype=float32)` / autocast over fp32 parameters).
GRAD_REDUCE_BYTES = 4


@dataclass(frozen=True)
class Affine:
    """Seconds = alpha per layer + beta per parameter element (of the layer, on one device)."""

    alpha: float = 0.0
    beta: float = 0.0

    def __add__(self, other: Affine) -> Affine:
        return Affine(self.alpha + other.alpha, self.beta + other.beta)

    def __mul__(self, k: float) -> Affine:
        return Affine(self.alpha * k, self.beta * k)

    def of(self, elements: float) -> float:
        """Seconds for one layer of `elements` parameter elements."""
        return self.alpha + self.beta * elements


@dataclass(frozen=True)
class DPComm:
    """A configuration's data-parallel collectives, per layer.

    per_mb: repeated every micro-batch, overlapping compute when the cluster overlaps DP communication;
    overlap: once per step, hidden behind the rank's backward when it overlaps; blocking: once per step, exposed;
    fixed: once per step, exposed (DDP: the latency of the call that rounds the bucket count up, plus, when the
    all-reduce overlaps backward, the last bucket, which has no backward left to hide behind).
    """

    per_mb: Affine = Affine()
    overlap: Affine = Affine()
    blocking: Affine = Affine()
    fixed: float = 0.0


def _collective(comm: CommModel, name: str, group: Group, bytes_per_elem: float) -> Affine:
    alpha, beta = comm.affine(name, group)
    return Affine(alpha, beta * bytes_per_elem)


def dp_comm(comm: CommModel, group: Group, zero: ZeroStage, dtype: DType, *, pipelined: bool,
            overlap: bool = True) -> DPComm:
    """The DP collectives of a configuration with `zero` over `group` (see the module docstring)."""
    if group.size <= 1:
        return DPComm()
    g = GRAD_REDUCE_BYTES
    rs = _collective(comm, "reduce_scatter", group, g)
    ag = _collective(comm, "all_gather", group, dtype.itemsize)
    if zero == ZeroStage.NONE:
        ar = _collective(comm, "all_reduce", group, g)
        if pipelined:
            return DPComm(blocking=ar)
        # Bucketed: ceil(bytes / 25 MiB) calls, at most bytes / 25 MiB + 1; each bucket also costs DDP's own host
        # work (`ddp_bucket_overhead_seconds`, planner.cost.FrameworkOverhead's DDP counterpart).
        ar = Affine(ar.alpha + comm.cluster.device.ddp_bucket_overhead_seconds, ar.beta)
        last = comm.all_reduce(DDP_BUCKET_BYTES, group) - ar.alpha if overlap else 0.0
        return DPComm(overlap=Affine(0.0, ar.beta + ar.alpha * g / DDP_BUCKET_BYTES), fixed=ar.alpha + last)
    if pipelined:  # gathered once, synced after the last micro-batch; ZeRO-3 gathers again for each backward
        return DPComm(per_mb=ag if zero == ZeroStage.FULL else Affine(), blocking=ag + rs)
    if zero == ZeroStage.OPTIMIZER:
        return DPComm(overlap=rs, blocking=ag)
    if zero == ZeroStage.GRADIENTS:
        return DPComm(per_mb=rs, blocking=ag)
    return DPComm(per_mb=ag * 2 + rs)
