"""The per-rank program `autopar run` starts: `python -m executor.worker RUN_SPEC.json` (under torchrun).

It joins the process group, applies the plan, optionally resumes from a checkpoint, trains, has rank 0 print progress
and write the report, and then tears down the way that keeps gloo from aborting at exit: barrier, destroy the
process group, flush, `os._exit(0)`.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from executor import checkpoint
from executor.apply import apply_plan
from executor.errors import LossDiverged
from executor.launch import ERROR_FILE, LAUNCHER_PID_ENV, RunSpec
from executor.mesh import init_distributed
from executor.optim import build_lr_schedulers
from executor.sources import resolve_data, resolve_model
from executor.train import RunReport, build_report, current_memory_bytes, train
from planner.model_profile import write_text_atomic

log = logging.getLogger("executor.worker")


def run(spec: RunSpec, *, local_rank: int) -> RunReport:
    """Train as `spec` says on this rank (the process group is joined here); every rank returns the report."""
    device_type = spec.plan.provenance.cluster.device.type
    device = init_distributed(device_type, local_rank=local_rank, timeout_s=spec.collective_timeout_s)
    torch.manual_seed(spec.seed)
    start_bytes = current_memory_bytes(device)
    model = resolve_model(spec.model, spec.model_options)
    compute_dtype = None if spec.dtype == "float32" else getattr(torch, spec.dtype)
    # model.build builds on the current default device: meta inside apply_plan, the CPU for its init fallback.
    example = model.example_inputs(spec.plan.strategy.micro_batch_size, device="meta")
    pm = apply_plan(spec.plan, model.build, spec.profile, loss_fn=getattr(model, "loss_fn", model.loss),
                    example_inputs=example, device=device,
                    seed=spec.seed, compute_dtype=compute_dtype, sync_batchnorm=spec.sync_batchnorm)
    optimizers = [spec.optimizer.build(part.parameters()) for part in pm.parts]
    state = checkpoint.TrainState(pm.parts, optimizers)
    if spec.resume:
        resumed = checkpoint.resume(state, spec.save_dir, fallback=spec.resume_fallback) if spec.save_dir else None
        if resumed is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", spec.save_dir)

    def on_step_end(done: int) -> None:
        state.step = done
        if spec.save_dir and ((spec.save_every and done % spec.save_every == 0) or done == spec.steps):
            checkpoint.save(state, spec.save_dir)

    # After the resume: the schedule continues at the checkpoint's step, from the peak rate of this run's options.
    schedulers = build_lr_schedulers(optimizers, spec.lr_schedule, total_steps=spec.steps, start_step=state.step,
                                     base_lr=spec.optimizer.lr)
    tokens = spec.profile.tokens_per_sample
    diverged: LossDiverged | checkpoint.StateDiverged | None = None
    try:
        records = train(pm, optimizers, resolve_data(spec.data, model, seed=spec.seed), steps=spec.steps,
                        start_step=state.step, tokens_per_sample=tokens, on_step_end=on_step_end,
                        schedulers=schedulers, clip_grad=spec.clip_grad, tensorboard_dir=spec.tensorboard)
    except (LossDiverged, checkpoint.StateDiverged) as exc:  # every rank sees the same all-reduced loss
        records, diverged = getattr(exc, "records", []), exc
    report = build_report(pm, records, spec.plan, tokens, start_bytes=start_bytes)
    if diverged is not None:
        report = report.model_copy(update={"diverged_at_step": diverged.step})
    if dist.get_rank() == 0 and spec.report_path:
        write_text_atomic(Path(spec.report_path), report.model_dump_json(indent=1))
    if diverged is not None:
        raise diverged
    return report


def die_with_launcher() -> None:
    """Have the kernel SIGKILL this worker when its parent dies, even by SIGKILL (Linux; a no-op elsewhere).

    torchrun's agent starts the workers in their own sessions, so nothing else would stop them. The parent is
    checked after the request: had the launcher died before it, this process was already re-parented.
    """
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); this worker may outlive its launcher",
                    ctypes.get_errno())
    expected = os.environ.get(LAUNCHER_PID_ENV)
    if expected and os.getppid() != int(expected):
        os._exit(1)


def teardown(exit_code: int = 0) -> None:
    """End the process without letting gloo abort at interpreter exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


@record
def main(argv: list[str] | None = None) -> None:
    """Entry point: read the run spec, train, tear down.

    An error every rank raises at the same point (divergence, an unusable checkpoint) ends every rank with exit
    code 1 after local rank 0 has left its one-line message in ERROR_FILE beside the spec for the launcher.
    """
    die_with_launcher()
    argv = sys.argv[1:] if argv is None else argv
    spec_path = Path(argv[0])
    spec = RunSpec.model_validate_json(spec_path.read_text())
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s",
                        stream=sys.stdout)
    logging.getLogger("torch").setLevel(logging.WARNING)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        run(spec, local_rank=local_rank)
    except (LossDiverged, checkpoint.StateDiverged, checkpoint.CheckpointError) as exc:
        if local_rank == 0:
            write_text_atomic(spec_path.with_name(ERROR_FILE), str(exc))
        teardown(1)  # its barrier keeps every rank alive until the report and the message are written
    teardown()


if __name__ == "__main__":
    main()
