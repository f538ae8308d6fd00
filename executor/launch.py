"""Check a run before any rank starts, then launch it through torchrun's elastic agent (`torch.distributed.run`).

One `launch` call runs on every node (as `torchrun` does): it writes the run description to a local file and starts
`nproc_per_node` workers (`python -m executor.worker SPEC`). A worker that raises records its traceback (torchelastic
`@record`); the agent then stops the other workers (SIGTERM, then SIGKILL) and `launch` raises `RankFailed` naming
the first rank that failed and its error. Ctrl-C reaches the agent, which stops every worker the same way.

An error every rank raises together (the loss diverged, a checkpoint is damaged) is not a crash: the workers leave
its one-line message in ERROR_FILE beside the run spec and `launch` raises `WorkerError` with it. Workers die with
the launcher even when it is killed with SIGKILL (`executor.worker.die_with_launcher`, which reads the launcher's
pid from LAUNCHER_PID_ENV).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from executor.errors import ExecutorError
from executor.optim import LRSchedule, mixed_precision, uses_fsdp2
from executor.sequence_parallel import check_sequence_parallel
from executor.sources import OptimizerSpec
from executor.train import RunReport
from planner.model_profile import ModelProfile, write_text_atomic
from planner.strategy import Plan

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500
#: File, beside the run spec, where the workers leave the message of an error all ranks raised together.
ERROR_FILE = "worker_error.txt"
#: Environment variable carrying the launcher's pid to the workers (who check that it is still their parent).
LAUNCHER_PID_ENV = "AUTOPAR_LAUNCHER_PID"


class RunSpec(BaseModel):
    """Everything a worker needs, written by the launcher and read by every rank."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan: Plan
    profile: ModelProfile = Field(description="Profile of the model being run (layer names, TP shards, edges).")
    model: str = Field(description="Zoo name or package.module:attr.")
    model_options: dict[str, Any] = Field(default_factory=dict, description="Size options for the zoo model.")
    data: str = Field(default="synthetic", description="'synthetic' or package.module:fn.")
    steps: int = Field(ge=1, description="Train until this many steps are done (resumed runs count the old ones).")
    seed: int = Field(default=0, description="Seed of initial weights and synthetic data.")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Compute dtype; other than float32 runs forward under autocast."
    )
    save_dir: str | None = Field(default=None, description="Checkpoint directory.")
    save_every: int = Field(default=0, ge=0, description="Checkpoint every N steps (0: only at the end).")
    resume: bool = Field(default=False, description="Continue from the latest checkpoint in save_dir.")
    resume_fallback: bool = Field(
        default=False, description="With resume: skip damaged checkpoints (logged) and use the newest good one."
    )
    report_path: str | None = Field(default=None, description="Where rank 0 writes the RunReport JSON.")
    collective_timeout_s: float = Field(default=300.0, gt=0, description="Longest wait of a collective for a peer.")
    clip_grad: float | None = Field(
        default=None, gt=0, description="Clip gradients to this L2 norm of the whole model's gradient (None: off)."
    )
    lr_schedule: LRSchedule = Field(default_factory=LRSchedule, description="Warmup and decay of the learning rate.")
    tensorboard: str | None = Field(default=None, description="Directory where rank 0 writes TensorBoard scalars.")
    sync_batchnorm: bool = Field(
        default=False, description="Synchronise BatchNorm statistics over the data-parallel axis (else a warning)."
    )

    @model_validator(mode="after")
    def _training_options(self) -> RunSpec:
        self.lr_schedule.check(base_lr=self.optimizer.lr, total_steps=self.steps)
        if self.dtype != "float32":  # refuses float16 where no loss scaling can run, before any rank starts
            strategy = self.plan.strategy
            mixed_precision(strategy, getattr(torch, self.dtype), fsdp2=uses_fsdp2(strategy))
        return self


class LaunchError(ExecutorError):
    """The launch itself does not match the plan (world size, model, device)."""


class WorkerError(ExecutorError):
    """Every rank stopped on the same user-fixable error (loss diverged, unusable checkpoint); one-line message."""


class RankFailed(Exception):
    """A worker failed; the job was stopped. Not an AutoparError: the message is a traceback from that rank."""

    def __init__(self, rank: int, exitcode: int, message: str) -> None:
        self.rank, self.exitcode, self.message = rank, exitcode, message
        super().__init__(f"rank {rank} failed (exit code {exitcode}):\n{message}")


def check_launch(
    plan: Plan, profile: ModelProfile, *, nnodes: int, nproc_per_node: int, cuda_devices: int
) -> None:
    """Refuse a launch that cannot run the plan, before starting any rank.

    `profile` must be the profile of the model about to run (as `profiler.profile(..., device="meta")` gives it);
    `cuda_devices` is how many CUDA devices this node sees.
    """
    dims = plan.strategy.dims
    if nnodes * nproc_per_node != dims.world_size:
        raise LaunchError(
            f"the plan needs world size {dims.world_size} (dp={dims.dp} tp={dims.tp} pp={dims.pp}) but the launch "
            f"gives nnodes * nproc_per_node = {nnodes} * {nproc_per_node} = {nnodes * nproc_per_node}; launch "
            f"{dims.world_size} processes or re-plan for this many devices"
        )
    if plan.provenance.profile_hash != profile.profile_hash:
        raise LaunchError(
            f"the plan was made for model '{plan.provenance.model_name}' (profile hash "
            f"{plan.provenance.profile_hash}) but the model to run, '{profile.name}' at seq_len "
            f"{profile.input.seq_len} in {profile.dtype.value}, has profile hash {profile.profile_hash}; re-plan for "
            "this model or run the model the plan was made for"
        )
    if plan.strategy.stages[-1].stop != profile.num_layers:
        raise LaunchError(
            f"the plan's stages cover layers 0..{plan.strategy.stages[-1].stop} but the model has "
            f"{profile.num_layers} layers; re-plan for this model"
        )
    illegal = [st.start for st in plan.strategy.stages[1:] if st.start not in profile.cut_points]
    if illegal:
        k = illegal[0]
        raise LaunchError(
            f"the plan starts a pipeline stage at layer {k} ('{profile.layers[k].name}'), which is not a legal cut of "
            f"this model: the stages would not compute its forward (legal cuts: {profile.cut_points or 'none'}); "
            "re-plan, or run with pp=1"
        )
    check_sequence_parallel(plan.strategy, profile)
    device_type = plan.provenance.cluster.device.type
    if device_type not in ("cuda", "cpu"):
        raise LaunchError(f"the plan's device type '{device_type}' is not supported (cuda or cpu)")
    if device_type == "cuda" and cuda_devices < nproc_per_node:
        raise LaunchError(
            f"the plan is for CUDA devices and wants {nproc_per_node} per node, this node has {cuda_devices}; run "
            "on a GPU node or plan for the cpu cluster preset"
        )


class SlurmLaunch(BaseModel):
    """Node count, this node's rank and the rendezvous host read from a Slurm job's environment."""

    model_config = ConfigDict(frozen=True)

    nnodes: int = Field(ge=1)
    node_rank: int = Field(ge=0)
    master_host: str


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list: 'gpu[03-05,09],cpu1' -> 'gpu03'."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            end = i
            break
    item = nodelist[:end]
    if "[" not in item:
        return item
    prefix, _, rest = item.partition("[")
    ranges, _, suffix = rest.partition("]")
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def slurm_launch(env: Mapping[str, str]) -> SlurmLaunch | None:
    """Launch settings from a Slurm environment (SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST), or None."""
    if "SLURM_NNODES" not in env or "SLURM_NODEID" not in env:
        return None
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_NNODES is set but SLURM_JOB_NODELIST is not; run inside an allocation (srun/sbatch)")
    return SlurmLaunch(nnodes=int(env["SLURM_NNODES"]), node_rank=int(env["SLURM_NODEID"]),
                       master_host=first_host(nodelist))


def torchrun_args(
    spec_path: Path, *, nnodes: int, nproc_per_node: int, node_rank: int | None, rdzv_endpoint: str | None,
    run_id: str, module: str = "executor.worker",
) -> list[str]:
    """Command-line arguments for `torch.distributed.run` that start the workers of this node (`python -m module
    SPEC`: the training worker, or `executor.calibrate` for `autopar calibrate`)."""
    args = ["--nproc-per-node", str(nproc_per_node), "--max-restarts", "0", "--monitor-interval", "0.1"]
    if nnodes == 1 and rdzv_endpoint is None:
        args += ["--standalone"]
    else:
        if rdzv_endpoint is None:
            raise LaunchError(f"a {nnodes}-node run needs --rdzv-endpoint HOST:PORT (the host of node 0)")
        endpoint = rdzv_endpoint if ":" in rdzv_endpoint else f"{rdzv_endpoint}:{DEFAULT_PORT}"
        args += ["--nnodes", str(nnodes), "--rdzv-endpoint", endpoint, "--rdzv-id", run_id]
        # A known node rank (Slurm, or given) uses static rendezvous: node 0 hosts the store, ranks are fixed.
        if node_rank is not None:
            args += ["--rdzv-backend", "static", "--node-rank", str(node_rank)]
        else:
            args += ["--rdzv-backend", "c10d"]
    return args + ["-m", module, str(spec_path)]


def _failure_text(failure: Any) -> str:
    data = failure.error_file_data or {}
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        stack = message.get("extraInfo", {}).get("py_callstack", "")
        return stack or str(message.get("message", ""))
    return str(failure.message or message or "no error recorded (killed by a signal?)")


def launch(
    spec: RunSpec, *, nnodes: int = 1, nproc_per_node: int, node_rank: int | None = None,
    rdzv_endpoint: str | None = None, run_id: str | None = None, workdir: str | Path | None = None,
) -> None:
    """Start this node's workers and wait for the job; raise `WorkerError` for an error all ranks reported (e.g. the
    loss diverged), `RankFailed` if a rank crashed.

    Every node must use the same `run_id`; by default it is derived from the endpoint and the plan, which the same
    command on every node agrees on (a random id per node would keep the nodes from ever meeting).
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if run_id is None:
        key = f"{rdzv_endpoint}|{spec.plan.strategy.model_dump_json()}|{spec.model}"
        run_id = "autopar-" + (hashlib.sha256(key.encode()).hexdigest()[:12] if nnodes > 1 else uuid.uuid4().hex[:12])
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="autopar-run-")
        workdir = tmp.name
    spec_path = Path(workdir) / "run_spec.json"
    write_text_atomic(spec_path, spec.model_dump_json())
    error_path = spec_path.with_name(ERROR_FILE)
    error_path.unlink(missing_ok=True)
    argv = torchrun_args(spec_path, nnodes=nnodes, nproc_per_node=nproc_per_node, node_rank=node_rank,
                         rdzv_endpoint=rdzv_endpoint, run_id=run_id)
    log.info("torchrun %s", " ".join(argv))
    # torchrun would set this too (with a warning): one thread per rank keeps ranks sharing cores from thrashing.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the agent starts the workers from this process
    try:
        torchrun.run(torchrun.parse_args(argv))
    except ChildFailedError as exc:
        if error_path.exists():
            raise WorkerError(error_path.read_text().strip()) from None
        rank, failure = exc.get_first_failure()
        raise RankFailed(rank, failure.exitcode, _failure_text(failure)) from None
    finally:
        if tmp is not None:
            tmp.cleanup()


def read_report(path: str | Path) -> RunReport:
    """The report rank 0 wrote."""
    return RunReport.model_validate_json(Path(path).read_text())
