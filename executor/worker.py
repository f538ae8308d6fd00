"""The per-rank program `autopar run` starts: `python -m executor.worker RUN_SPEC.json` (under torchrun).

It joins the process group, applies the plan, optionally resumes from a checkpoint, trains, has rank 0 print progress
and write the report, and then tears down the way that keeps gloo from aborting at exit: barrier, destroy the
process group, flush, `os._exit(0)`.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from executor import checkpoint
from executor.apply import apply_plan
from executor.launch import RunSpec
from executor.mesh import init_distributed
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
    autocast = None if spec.dtype == "float32" else getattr(torch, spec.dtype)
    pm = apply_plan(spec.plan, lambda: model.build("meta"), spec.profile, loss_fn=model.loss, device=device,
                    seed=spec.seed, autocast_dtype=autocast)
    optimizers = [spec.optimizer.build(part.parameters()) for part in pm.parts]
    state = checkpoint.TrainState(pm.parts, optimizers)
    if spec.resume:
        latest = checkpoint.latest_checkpoint(spec.save_dir) if spec.save_dir else None
        if latest is None:
            log.warning("--resume: no checkpoint in %s, starting from step 0", spec.save_dir)
        else:
            checkpoint.load(state, latest)

    def on_step_end(done: int) -> None:
        state.step = done
        if spec.save_dir and ((spec.save_every and done % spec.save_every == 0) or done == spec.steps):
            checkpoint.save(state, spec.save_dir)

    tokens = spec.profile.tokens_per_sample
    records = train(pm, optimizers, resolve_data(spec.data, model, seed=spec.seed), steps=spec.steps,
                    start_step=state.step, tokens_per_sample=tokens, on_step_end=on_step_end)
    report = build_report(pm, records, spec.plan, tokens, start_bytes=start_bytes)
    if dist.get_rank() == 0 and spec.report_path:
        write_text_atomic(Path(spec.report_path), report.model_dump_json(indent=1))
    return report


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
    """Entry point: read the run spec, train, tear down."""
    argv = sys.argv[1:] if argv is None else argv
    spec = RunSpec.model_validate_json(Path(argv[0]).read_text())
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s",
                        stream=sys.stdout)
    logging.getLogger("torch").setLevel(logging.WARNING)
    run(spec, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    teardown()


if __name__ == "__main__":
    main()
