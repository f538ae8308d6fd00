"""The plan contract: parallel degrees, a strategy, its predicted cost, and the plan the search returns.

All of it is plain pydantic data with no torch import, written by the planner and read by the executor and the
service. Layer ranges are half-open (`start` included, `stop` excluded) indices into `ModelProfile.layers`.
"""

from __future__ import annotations

from enum import Enum, IntEnum
from pathlib import Path

from pydantic import Field, model_validator

from planner.cluster import ClusterSpec
from planner.model_profile import DType, write_text_atomic
from planner.validation import Contract, check_fields

PLAN_SCHEMA_VERSION = 1


class _Strict(Contract):
    @model_validator(mode="after")
    def _finite(self) -> _Strict:
        # Finite only: a prediction for large but valid inputs may exceed the profile's per-sample bounds.
        check_fields(self, bounded=False)
        return self


class MeshAxis(str, Enum):
    """Names of the device-mesh axes. An *axis* is a mesh axis; a *dim* is a tensor dimension."""

    PP = "pp"
    DP = "dp"
    TP = "tp"


class ParallelDims(_Strict):
    """Parallel degrees; `dp * tp * pp` must equal `world_size`."""

    dp: int = Field(ge=1, description="Data-parallel degree (replicas, or ZeRO/FSDP shards).")
    tp: int = Field(ge=1, description="Tensor-parallel degree (Megatron column/row split inside layers).")
    pp: int = Field(ge=1, description="Pipeline-parallel degree (number of ranks along the pipeline).")
    world_size: int = Field(ge=1, description="Total number of devices.")

    @model_validator(mode="after")
    def _product(self) -> ParallelDims:
        if self.dp * self.tp * self.pp != self.world_size:
            raise ValueError(
                f"dp*tp*pp = {self.dp}*{self.tp}*{self.pp} = {self.dp * self.tp * self.pp} "
                f"does not equal world_size {self.world_size}"
            )
        return self

    def degree(self, axis: MeshAxis) -> int:
        """Degree of one mesh axis."""
        return getattr(self, axis.value)


class ZeroStage(IntEnum):
    """How the data-parallel axis shards training state: 0 replicated (DDP) ... 3 everything (FSDP full shard)."""

    NONE = 0
    OPTIMIZER = 1
    GRADIENTS = 2
    FULL = 3


class Schedule(str, Enum):
    """Pipeline schedule."""

    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED_1F1B = "interleaved_1f1b"


class Recompute(str, Enum):
    """Activation recomputation: none, selective (attention core only), or full (whole layers)."""

    NONE = "none"
    SELECTIVE = "selective"
    FULL = "full"


class PlanKind(str, Enum):
    """What kind of parallelism a plan uses."""

    DATA = "data"
    MODEL = "model"
    HYBRID = "hybrid"


class StageSpec(_Strict):
    """One pipeline stage: layers [start, stop). With interleaving, stage s runs on pipeline rank s % pp."""

    start: int = Field(ge=0)
    stop: int = Field(ge=1)
    layers: list[str] = Field(
        default_factory=list,
        description="Fully qualified module names of layers [start, stop) (the profile's layer names), so the plan "
                    "can be used without its profile (`autopar export`); empty in plans made before they were "
                    "recorded.",
    )

    @model_validator(mode="after")
    def _nonempty(self) -> StageSpec:
        if self.stop <= self.start:
            raise ValueError(f"stage [{self.start}, {self.stop}) holds no layer")
        if self.layers and len(self.layers) != self.stop - self.start:
            raise ValueError(f"stage [{self.start}, {self.stop}) names {len(self.layers)} layers, "
                             f"{self.stop - self.start} expected")
        return self


DEFAULT_MESH_ORDER = (MeshAxis.PP, MeshAxis.DP, MeshAxis.TP)


class Strategy(_Strict):
    """One way to train: degrees, sharding, micro-batching, schedule, recomputation and stage boundaries."""

    dims: ParallelDims
    mesh_order: tuple[MeshAxis, ...] = Field(
        default=DEFAULT_MESH_ORDER,
        description="Mesh axes outermost first; the last gets consecutive ranks (by default tp, inside a node).",
    )
    zero_stage: ZeroStage = Field(default=ZeroStage.NONE, description="Sharding of the data-parallel axis.")
    micro_batch_size: int = Field(ge=1, le=2**31, description="Samples per micro-batch per data-parallel replica.")
    num_micro_batches: int = Field(
        ge=1, le=2**31, description="Micro-batches per step per replica (gradient accumulation)."
    )
    schedule: Schedule = Field(default=Schedule.ONE_F_ONE_B)
    virtual_stages: int = Field(default=1, ge=1, description="Stages per pipeline rank (>1 only when interleaved).")
    recompute: Recompute = Field(default=Recompute.NONE)
    sequence_parallel: bool = Field(
        default=False,
        description="With tp > 1: layers whose profile allows it run sequence-parallel (norms, dropout and residual "
                    "adds on sequence shards; all-gather and reduce-scatter around each TP region instead of an "
                    "all-reduce). False in plans made before it existed.",
    )
    stages: list[StageSpec] = Field(description="pp * virtual_stages contiguous stages covering every layer.")

    @model_validator(mode="after")
    def _consistent(self) -> Strategy:
        if sorted(self.mesh_order, key=lambda a: a.value) != sorted(MeshAxis, key=lambda a: a.value):
            raise ValueError(f"mesh_order must name each of pp, dp, tp once, got {[a.value for a in self.mesh_order]}")
        if self.schedule == Schedule.INTERLEAVED_1F1B:
            if self.virtual_stages < 2:
                raise ValueError("the interleaved 1F1B schedule needs virtual_stages >= 2")
            if self.num_micro_batches % self.dims.pp:
                raise ValueError(
                    f"interleaved 1F1B needs num_micro_batches ({self.num_micro_batches}) divisible by pp "
                    f"({self.dims.pp})"
                )
        elif self.virtual_stages != 1:
            raise ValueError(f"virtual_stages={self.virtual_stages} needs schedule 'interleaved_1f1b'")
        if self.sequence_parallel and self.dims.tp == 1:
            raise ValueError("sequence_parallel needs tensor parallelism (tp > 1); set it false or plan with tp > 1")
        if self.dims.pp > 1 and self.num_micro_batches < self.dims.pp:
            # torch.distributed.pipelining refuses it at run time; every pipeline rank needs a micro-batch in flight.
            raise ValueError(
                f"a {self.dims.pp}-stage pipeline needs at least {self.dims.pp} micro-batches per step, got "
                f"num_micro_batches={self.num_micro_batches}; use a smaller micro_batch_size or a larger global batch"
            )
        expected = self.dims.pp * self.virtual_stages
        if len(self.stages) != expected:
            raise ValueError(f"{len(self.stages)} stages given, pp*virtual_stages = {expected} expected")
        if self.stages[0].start != 0:
            raise ValueError("the first stage must start at layer 0")
        for a, b in zip(self.stages, self.stages[1:]):
            if a.stop != b.start:
                raise ValueError(f"stages must be contiguous: one ends at {a.stop}, the next starts at {b.start}")
        return self

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all replicas."""
        return self.micro_batch_size * self.num_micro_batches * self.dims.dp

    @property
    def kind(self) -> PlanKind:
        """data when only dp > 1 (or a single device), model when dp == 1, hybrid otherwise."""
        model_parallel = self.dims.tp > 1 or self.dims.pp > 1
        if not model_parallel:
            return PlanKind.DATA
        return PlanKind.MODEL if self.dims.dp == 1 else PlanKind.HYBRID

    def stage_ranks(self, stage: int) -> int:
        """Pipeline rank that runs `stage` (round-robin when interleaved)."""
        return stage % self.dims.pp

    def describe(self) -> str:
        """One-line summary, e.g. 'dp=4 tp=2 pp=1 zero=1 mb=4x8 1f1b recompute=none'."""
        d = self.dims
        sched = self.schedule.value + (f"(v={self.virtual_stages})" if self.virtual_stages > 1 else "")
        order = "" if tuple(self.mesh_order) == tuple(DEFAULT_MESH_ORDER) else " mesh=" + ",".join(a.value for a in self.mesh_order)
        return (
            f"dp={d.dp} tp={d.tp} pp={d.pp} zero={int(self.zero_stage)} "
            f"mb={self.micro_batch_size}x{self.num_micro_batches} {sched} recompute={self.recompute.value}{order}"
            + (" sp" if self.sequence_parallel else "")
        )


class CommCost(_Strict):
    """One collective of a step, on one mesh axis."""

    collective: str = Field(description="all_reduce, reduce_scatter, all_gather, or p2p.")
    axis: MeshAxis
    purpose: str = Field(description="e.g. 'gradient sync', 'tp block outputs', 'stage activations'.")
    bytes: float = Field(ge=0, description="Bytes per device per step.")
    seconds: float = Field(ge=0, description="Total time of these collectives in a step.")
    exposed_seconds: float = Field(ge=0, description="Part not hidden behind compute.")


class TimeBreakdown(_Strict):
    """Where a predicted step's time goes (critical path, seconds)."""

    compute: float = Field(ge=0, description="Forward + backward compute of the slowest pipeline rank.")
    recompute: float = Field(ge=0, description="Extra forward compute from activation recomputation.")
    bubble: float = Field(ge=0, description="Pipeline idle time.")
    exposed_comm: float = Field(ge=0, description="Communication not overlapped with compute.")
    optimizer: float = Field(ge=0, description="Optimizer step.")
    comms: list[CommCost] = Field(default_factory=list)


class MemoryBreakdown(_Strict):
    """Peak memory of one device of one pipeline rank, bytes."""

    parameters: float = Field(ge=0)
    gradients: float = Field(ge=0)
    optimizer_state: float = Field(ge=0)
    activations: float = Field(ge=0)
    comm_buffers: float = Field(ge=0)
    runtime: float = Field(
        default=0.0, ge=0, description="The runtime's own memory (DeviceSpec.runtime_memory_bytes, plus "
                                       "dtensor_runtime_memory_bytes with DTensor parameters). 0 in older plans.")
    optimizer_temporaries: float = Field(
        default=0.0, ge=0, description="AdamW step's temporaries (planner.memory.estimate_optimizer_temp_bytes).")
    output_buffers: float = Field(
        default=0.0, ge=0, description="The last layer's output beyond its saved activations: its gradients in "
                                       "backward (estimate_output_buffer_bytes).")
    total: float = Field(ge=0, description="Sum of the above.")
    capacity: float = Field(gt=0, description="Device memory less the safety margin.")

    @property
    def headroom(self) -> float:
        """Bytes left (negative when it does not fit)."""
        return self.capacity - self.total


class RankTime(_Strict):
    """One pipeline rank's time per micro-batch as the cost model counts it (what the plan chart draws)."""

    forward: float = Field(ge=0, description="Seconds of its forward passes (all its chunks) per micro-batch.")
    backward: float = Field(
        ge=0, description="Seconds of its backward passes per micro-batch (recompute included) plus the rest of its "
                          "per-micro-batch time (TP and pipeline communication, exposed ZeRO collectives)."
    )


class Prediction(_Strict):
    """What the cost model predicts for a strategy."""

    step_seconds: float = Field(gt=0)
    time: TimeBreakdown
    samples_per_second: float = Field(ge=0)
    tokens_per_second: float = Field(ge=0)
    model_flops_per_gpu: float = Field(ge=0, description="Model FLOP/s per device (no recompute counted).")
    hardware_flops_per_gpu: float = Field(ge=0, description="Executed FLOP/s per device (recompute counted).")
    mfu: float = Field(ge=0, description="Model FLOP/s over peak.")
    memory: list[MemoryBreakdown] = Field(description="Per pipeline rank.")
    fits: bool
    rank_times: list[RankTime] = Field(
        default_factory=list, description="Per pipeline rank, per micro-batch (empty in plans made before it)."
    )

    @property
    def peak_memory(self) -> float:
        """Largest per-device total over pipeline ranks."""
        return max(m.total for m in self.memory)


class Alternative(_Strict):
    """A candidate the search ranked below the chosen one, and why it lost."""

    strategy: Strategy
    prediction: Prediction
    reason: str = Field(description="e.g. 'does not fit: 12.4 GB over on stage 0' or '9% slower: bubble 14%'.")


class RunCalibration(_Strict):
    """How the plan's cluster was fitted to recorded runs (`autopar plan --calibration`, `planner.run_fit`)."""

    source: str = Field(description="Run store path or service URL the runs came from.")
    runs: int = Field(ge=1, description="Runs the fit used.")
    factors: dict[str, float] = Field(description="Fitted value over the prior cluster's, per fitted parameter.")
    at_prior: list[str] = Field(default_factory=list, description="Parameters the runs could not identify (kept).")
    at_bound: list[str] = Field(default_factory=list, description="Parameters stopped at their physical bound.")
    median_abs_log_error_before: float = Field(ge=0, description="Median |log(measured / predicted)| before.")
    max_abs_log_error_before: float = Field(ge=0, description="Largest |log(measured / predicted)| before.")
    median_abs_log_error_after: float = Field(ge=0, description="Median |log(measured / predicted)| after.")
    max_abs_log_error_after: float = Field(ge=0, description="Largest |log(measured / predicted)| after.")


class VerifiedCandidate(_Strict):
    """One candidate that `--verify-top-k` ran on the real cluster, next to its prediction."""

    strategy: str = Field(description="Strategy.describe() of the candidate.")
    predicted_rank: int = Field(ge=1, description="Its place in the planner's order (1: the planner's choice).")
    predicted_step_seconds: float = Field(gt=0, description="The cost model's step time for it.")
    measured_step_seconds: float | None = Field(
        default=None, gt=0, description="Median measured step time (first step excluded); None when the run failed.")
    run_id: str | None = Field(default=None, description="Id of its run record; None when it was not recorded.")
    failure: str | None = Field(default=None, description="Why the run failed, when it did.")


class Verification(_Strict):
    """How the plan's strategy was chosen by running the best candidates (`autopar plan --verify-top-k`)."""

    steps: int = Field(ge=1, description="Training steps each candidate ran.")
    world_size: int = Field(ge=1, description="Processes each candidate ran on.")
    candidates: list[VerifiedCandidate] = Field(description="Every candidate run, in the planner's order.")


class Provenance(_Strict):
    """Where a plan came from."""

    model_name: str
    profile_hash: str
    cluster: ClusterSpec
    planner_version: str
    search_seconds: float = Field(ge=0)
    solver_status: str = Field(description="CP-SAT status of the chosen stage assignment (OPTIMAL, FEASIBLE, ...).")
    candidates_evaluated: int = Field(ge=0)
    dtype: DType | None = Field(default=None, description="Precision the plan was made for (the profile's); "
                                "`autopar run` trains in it. None in plans written before it was recorded.")
    model_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Options of the model reference `model_name` (zoo config fields, factory "
                                          "arguments) the plan was made with; empty when none were given.")
    seq_len: int | None = Field(default=None, ge=1, description="Tokens per sample the model was profiled at; "
                                "None for non-sequence inputs and in plans written before it was recorded.")
    calibration: RunCalibration | None = Field(
        default=None, description="Set when the cluster was fitted to recorded runs before planning.")
    verification: Verification | None = Field(
        default=None, description="Set when the strategy was chosen by running candidates (`--verify-top-k`).")


class Plan(_Strict):
    """The planner's answer."""

    schema_version: int = Field(default=PLAN_SCHEMA_VERSION)
    kind: PlanKind
    strategy: Strategy
    prediction: Prediction
    explanation: str = Field(description="Why this strategy, in a few sentences.")
    alternatives: list[Alternative] = Field(default_factory=list)
    provenance: Provenance

    @model_validator(mode="after")
    def _check(self) -> Plan:
        if self.schema_version != PLAN_SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {self.schema_version} is not supported; re-run `autopar plan`")
        if self.kind != self.strategy.kind:
            raise ValueError(f"plan kind '{self.kind.value}' disagrees with its strategy ('{self.strategy.kind.value}')")
        return self

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise; also write atomically to `path` when given."""
        text = self.model_dump_json(indent=1)
        if path is not None:
            write_text_atomic(Path(path), text)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> Plan:
        """Load from a file path or a JSON string."""
        s = str(path_or_text)
        return cls.model_validate_json(s if s.lstrip().startswith("{") else Path(s).read_text())
