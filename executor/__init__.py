"""Run a plan with torch.distributed: DeviceMesh, DTensor tensor parallel, pipelining, FSDP2 / replicate / DDP.

Inside a launched process (own training loop):  `init_distributed`, then `apply_plan` -> `ParallelModel`.
autopar's own loop:                              `train`, `build_report` (see `executor.worker`).
Launching (what `autopar run` does):            `check_launch`, then `launch` with a `RunSpec`.
"""

from executor.apply import ParallelModel, apply_plan
from executor.errors import ExecutorError
from executor.launch import LaunchError, RankFailed, RunSpec, check_launch, launch, slurm_launch
from executor.mesh import build_mesh, init_distributed
from executor.train import RunReport, StepRecord, build_report, train

__all__ = [
    "ExecutorError",
    "LaunchError",
    "ParallelModel",
    "RankFailed",
    "RunReport",
    "RunSpec",
    "StepRecord",
    "apply_plan",
    "build_mesh",
    "build_report",
    "check_launch",
    "init_distributed",
    "launch",
    "slurm_launch",
    "train",
]
