"""The run-record contract: one `autopar run`'s measurement next to the plan's prediction, kept to learn from.

A `RunRecord` holds the whole `Plan` (its prediction and provenance: profile hash, cluster, dtype), the model
reference and run settings, the versions that ran it, what was measured (median and per-step seconds, per-rank peak
memory and how it was measured, tokens/s), what was predicted (step seconds, its breakdown, per-rank memory) and the
errors derived from the two. The profile itself is not in the record (only its hash): stores keep each profile once
(`api.run_store`), and `planner.run_fit` needs it to re-evaluate the plan on a cluster with other factors.

`record_from_report` builds a record from an `executor.train.RunReport`, read by attribute: planner never imports
the executor (nor torch).
"""

from __future__ import annotations

import math
import platform
import socket
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from planner.model_profile import DType
from planner.strategy import Plan, TimeBreakdown
from planner.validation import Contract, check_fields

RUN_RECORD_SCHEMA_VERSION = 1

MemoryKind = Literal["cuda_max_allocated", "cpu_peak_rss", "cpu_peak_private"]


class _Strict(Contract):
    @model_validator(mode="after")
    def _finite(self) -> _Strict:
        check_fields(self)  # finite; seconds and bytes within planner.validation's physical ranges
        return self


class RunSettings(_Strict):
    """How the run was launched."""

    steps: int = Field(ge=1, description="Training steps the run was asked for.")
    dtype: DType = Field(description="Precision the run trained in.")
    nproc_per_node: int = Field(ge=1, description="Processes started on each node.")
    nnodes: int = Field(ge=1, description="Nodes taking part.")
    global_batch_size: int = Field(ge=1, description="Samples per optimizer step over all replicas.")
    device_type: str = Field(description="torch device type the ranks ran on ('cuda' or 'cpu').")


class RunVersions(_Strict):
    """What software and host produced the measurement."""

    planner: str = Field(description="autopar planner version (`planner.PLANNER_VERSION`).")
    torch: str = Field(description="torch.__version__ of the run.")
    python: str = Field(description="Python version of the run.")
    host: str = Field(description="Host name of node 0.")


class RankMeasurement(_Strict):
    """One rank's peak memory next to its pipeline rank's prediction."""

    rank: int = Field(ge=0)
    pp_rank: int = Field(ge=0)
    peak_bytes: int = Field(ge=0, description="Measured peak (see Measured.memory_kind).")
    start_bytes: int = Field(ge=0, description="Same measure before the model was built (interpreter, torch).")
    predicted_bytes: float | None = Field(default=None, ge=0, description="The plan's peak for this pipeline rank.")


class Measured(_Strict):
    """What the run measured."""

    step_seconds: float = Field(gt=0, description="Median step time (first step excluded when there are more).")
    per_step_seconds: list[float] = Field(min_length=1, description="Wall seconds of every step, in order.")
    tokens_per_second: float = Field(ge=0, description="Global tokens (or samples) per second at the median step.")
    memory_kind: MemoryKind = Field(description="cuda_max_allocated; cpu_peak_private (peak private RSS: executor.train); "
                                                      "cpu_peak_rss in older records (with torch's code pages).")
    memory: list[RankMeasurement] = Field(description="Per global rank.")

    @field_validator("per_step_seconds")
    @classmethod
    def _steps_finite(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not math.isfinite(x) or x < 0]
        if bad:
            raise ValueError(f"per_step_seconds holds {bad[0]!r}; every step time must be a finite number >= 0")
        return v


class Predicted(_Strict):
    """What the plan predicted for this run."""

    step_seconds: float = Field(gt=0, description="Predicted seconds per step.")
    time: TimeBreakdown = Field(description="Where the predicted step's time goes.")
    memory_bytes: list[float | None] = Field(description="Predicted peak per global rank (its pipeline rank's).")


class RunErrors(_Strict):
    """Measured over predicted: 1.0 is a perfect prediction, 2.0 a run twice as slow (or large) as predicted."""

    step_time_ratio: float = Field(gt=0, description="Measured over predicted median step time.")
    memory_ratio: list[float | None] = Field(
        description="Per global rank, measured used bytes over predicted (None without a prediction); on CPU the "
                    "measure is the RSS growth since before the model was built.")


def used_bytes(m: RankMeasurement, kind: MemoryKind) -> int:
    """Bytes the plan's memory model describes: peak allocated on CUDA, growth since start on CPU."""
    return m.peak_bytes - m.start_bytes if kind != "cuda_max_allocated" else m.peak_bytes


def derive_errors(measured: Measured, predicted: Predicted) -> RunErrors:
    """The errors of a prediction against a measurement."""
    ratios: list[float | None] = []
    for m in measured.memory:
        ratios.append(used_bytes(m, measured.memory_kind) / m.predicted_bytes if m.predicted_bytes else None)
    return RunErrors(step_time_ratio=measured.step_seconds / predicted.step_seconds, memory_ratio=ratios)


class RunRecord(Contract):
    """One run: the plan, how it was launched, what it measured and predicted, and the errors between them."""

    schema_version: int = Field(default=RUN_RECORD_SCHEMA_VERSION)
    id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$", description="Run id.")
    created: datetime = Field(description="When the run finished (UTC).")
    plan: Plan = Field(description="The plan that ran, with its prediction and provenance.")
    plan_id: str | None = Field(default=None, max_length=100, description="Service id of the plan, if it made it.")
    profile_id: str | None = Field(
        default=None, max_length=100,
        description="Service id of the model's profile (POST /v1/profiles), so the service can refit to the run.")
    model: str = Field(description="Model reference the run built (zoo name, file.py:factory, ...).")
    model_options: dict[str, str | int | float | bool] = Field(default_factory=dict, description="Its options.")
    settings: RunSettings
    versions: RunVersions
    measured: Measured
    predicted: Predicted
    errors: RunErrors

    @model_validator(mode="after")
    def _consistent(self) -> RunRecord:
        if self.schema_version != RUN_RECORD_SCHEMA_VERSION:
            raise ValueError(f"run record schema_version {self.schema_version} is not supported")
        if self.created.tzinfo is None:
            raise ValueError("created must carry a time zone (UTC), e.g. 2025-01-01T00:00:00Z")
        expected = derive_errors(self.measured, self.predicted)
        if not math.isclose(expected.step_time_ratio, self.errors.step_time_ratio, rel_tol=1e-9):
            raise ValueError(f"errors.step_time_ratio {self.errors.step_time_ratio:g} is not measured / predicted "
                             f"step seconds ({expected.step_time_ratio:g}); derive it with derive_errors")
        return self

    @property
    def cluster_name(self) -> str:
        """Name of the cluster the plan was made for (what fitting groups runs by)."""
        return self.plan.provenance.cluster.name

    @property
    def profile_hash(self) -> str:
        """Hash of the profile the plan was made from."""
        return self.plan.provenance.profile_hash


def current_versions(torch_version: str, planner_version: str) -> RunVersions:
    """The versions of this process and host (the caller passes torch's: planner does not import it)."""
    return RunVersions(planner=planner_version, torch=torch_version, python=platform.python_version(),
                       host=socket.gethostname())


def new_run_id() -> str:
    """A fresh run id."""
    return "run-" + uuid.uuid4().hex[:16]


def record_from_report(report: Any, plan: Plan, *, model: str, model_options: dict[str, Any], steps: int,
                       dtype: DType, nproc_per_node: int, nnodes: int, versions: RunVersions,
                       plan_id: str | None = None, profile_id: str | None = None,
                       created: datetime | None = None) -> RunRecord:
    """A record of a finished run from its `executor.train.RunReport` (read by attribute) and the plan it ran.

    Raises ValueError when the report has no measured step time (no step finished)."""
    if not report.measured_step_seconds:
        raise ValueError("the run report has no measured step time (no step finished); nothing to record")
    measured = Measured(
        step_seconds=report.measured_step_seconds, per_step_seconds=[s.seconds for s in report.steps],
        tokens_per_second=report.global_batch_size * report.tokens_per_sample / report.measured_step_seconds,
        memory_kind=report.memory_kind,
        memory=[RankMeasurement(rank=m.rank, pp_rank=m.pp_rank, peak_bytes=m.peak_bytes, start_bytes=m.start_bytes,
                                predicted_bytes=m.predicted_bytes) for m in report.memory],
    )
    predicted = Predicted(step_seconds=plan.prediction.step_seconds, time=plan.prediction.time,
                          memory_bytes=[m.predicted_bytes for m in report.memory])
    settings = RunSettings(steps=steps, dtype=dtype, nproc_per_node=nproc_per_node, nnodes=nnodes,
                           global_batch_size=report.global_batch_size, device_type=report.device_type)
    options = {k: v for k, v in model_options.items() if isinstance(v, (str, int, float, bool))}
    return RunRecord(id=new_run_id(), created=created or datetime.now(timezone.utc), plan=plan, plan_id=plan_id,
                     profile_id=profile_id, model=model, model_options=options, settings=settings,
                     versions=versions, measured=measured, predicted=predicted,
                     errors=derive_errors(measured, predicted))
