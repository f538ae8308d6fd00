"""`autopar run`: launch a plan on this node's processes through torchrun, then report measured against predicted.

    autopar run plan.json --model gpt-tiny --steps 20 --nproc-per-node 2
    autopar run plan.json --model gpt-tiny --save-dir ckpt --save-every 10 --resume --report run.json
    autopar run plan.json --model gpt-tiny --save-dir ckpt --resume --resume-fallback   # skip a damaged checkpoint
    autopar run plan.json --model gpt-tiny --clip-grad 1.0 --lr-schedule cosine --warmup 100 --tensorboard tb/
    autopar run --plan-first gpt-tiny --cluster cpu --nodes 1 --global-batch 16 --nproc-per-node 4
    autopar run --plan-first examples/hf_gpt2.py:model --cluster cpu --global-batch 8 --nproc-per-node 2  # own model
    autopar run plan.json --model gpt2-medium --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500   # each node
    srun --ntasks-per-node=1 autopar run plan.json --model gpt2-medium   # Slurm: nodes and ranks from the job

--model / --plan-first take any model reference (`profiler.resolve`: a zoo name with --option key=value,
path/to/file.py:factory, package.module:factory, hf:path/to/config.json). The run trains in the plan's precision
(the one it was planned in) unless --dtype says otherwise; --plan-first plans in --dtype, else in what --cluster trains
in (`planner.precision.default_dtype`). Before any rank starts it refuses a world size that differs from the plan's,
a precision the plan was not made for (naming the --dtype that fits), a model whose profile hash differs from the
plan's, and a device type this node does not have.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from planner.errors import AutoparError

console = Console()
err_console = Console(stderr=True)


def parse_options(items: list[str]) -> dict[str, object]:
    """`--option key=value` items as a dict, numbers and true/false converted."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise AutoparError(f"--option '{item}' is not key=value (e.g. --option num_layers=4)")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = {"true": True, "false": False}.get(value.lower(), value)
    return out


def _profile_for(ref, plan, dtype: str | None):
    """The meta-device profile of the model to run, in the precision to train in: --dtype, else the plan's.

    A plan that does not record its precision (older plan files) is matched by its profile hash against each
    precision; a --dtype the plan was not made for is refused with the flag that fits.
    """
    from planner.model_profile import DType
    from planner.precision import RUN_DTYPES, default_dtype, parse_dtype
    from profiler.resolve import resolve_profile

    wanted = parse_dtype(dtype) if dtype else (plan.provenance.dtype or default_dtype(plan.provenance.cluster))
    profile = resolve_profile(ref, dtype=wanted).profile
    if profile.profile_hash == plan.provenance.profile_hash:
        return profile
    fits = next((d for d in DType if profile.model_copy(update={"dtype": d}).profile_hash
                 == plan.provenance.profile_hash), None)
    if fits is None:
        return profile  # another model or shape: `check_launch` says so
    if dtype:
        raise AutoparError(f"the plan was made for {fits.value} training but --dtype {dtype} was given; add --dtype "
                           f"{RUN_DTYPES[fits]} (or re-plan with --dtype {dtype})")
    return resolve_profile(ref, dtype=fits).profile


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.1f}"


def _print_report(report, dtype: str) -> None:
    table = Table(title=f"autopar run: {report.strategy} in {dtype}", show_lines=False)
    table.add_column("quantity")
    table.add_column("measured", justify="right")
    table.add_column("predicted", justify="right")
    table.add_column("ratio", justify="right")
    pred = report.predicted_step_seconds
    meas = report.measured_step_seconds
    ratio = f"{report.step_time_ratio:.2f}x" if report.step_time_ratio else "-"
    table.add_row("step time (ms)", f"{meas * 1e3:.1f}" if meas else "-", f"{pred * 1e3:.1f}" if pred else "-", ratio)
    if report.steps:
        table.add_row("final loss", f"{report.steps[-1].loss:.5f}", "-", "-")
    # On CPU the peak RSS includes the interpreter and torch: show the growth since before the model was built.
    cpu = report.memory_kind == "cpu_peak_rss"
    kind = "peak RSS - start" if cpu else "peak allocated"
    for m in report.memory:
        used = m.peak_bytes - m.start_bytes if cpu else m.peak_bytes
        r = f"{used / m.predicted_bytes:.2f}x" if m.predicted_bytes else "-"
        table.add_row(f"rank {m.rank} (pp {m.pp_rank}) {kind} MiB", _mib(used), _mib(m.predicted_bytes), r)
    console.print(table)


def run_command(
    plan_path: Annotated[Path | None, typer.Argument(help="Plan JSON from `autopar plan`.")] = None,
    model: Annotated[str | None, typer.Option(
        help="Zoo name, path/to/file.py:factory / package.module:factory (the file also defines "
        "example_batch(batch_size) and optionally loss_fn) or hf:path/to/config.json.")] = None,
    option: Annotated[list[str], typer.Option(
        help="Model option key=value: zoo config field, factory argument, HF config field (repeatable).")] = [],  # noqa: B006
    steps: Annotated[int, typer.Option(min=1, help="Train until this many steps are done.")] = 10,
    data: Annotated[str, typer.Option(help="'synthetic' or package.module:fn(step, global_batch).")] = "synthetic",
    nproc_per_node: Annotated[int | None, typer.Option(
        min=1, help="Processes on this node (default: plan / nnodes).")] = None,
    nnodes: Annotated[int | None, typer.Option(help="Nodes (default: SLURM_NNODES or 1).")] = None,
    node_rank: Annotated[int | None, typer.Option(help="This node's rank (default: SLURM_NODEID).")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="HOST:PORT of node 0 for multi-node runs.")] = None,
    run_id: Annotated[str | None, typer.Option(help="Job id shared by all nodes (default: SLURM_JOB_ID or derived).")] = None,
    save_dir: Annotated[Path | None, typer.Option(help="Checkpoint directory (torch.distributed.checkpoint).")] = None,
    save_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N steps (0: only at the end).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in --save-dir.")] = False,
    resume_fallback: Annotated[bool, typer.Option(
        help="With --resume: skip a damaged latest checkpoint (logged) and resume from the newest good one.")] = False,
    report: Annotated[Path | None, typer.Option(help="Also write the run report as JSON here.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initial weights and synthetic data.")] = 0,
    collective_timeout: Annotated[float, typer.Option(
        min=1.0, help="Seconds a collective waits for a peer before the job fails (a hung rank ends the run).")] = 300.0,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd.")] = "adamw",
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 3e-4,
    dtype: Annotated[str | None, typer.Option(
        help="float32, or bfloat16/float16: FSDP2 mixed precision (bf16/fp16 parameters, fp32 gradient reduction) "
        "under FSDP/replicate, else autocast; float16 adds loss scaling, single device or DDP only. Default: the "
        "plan's precision (with --plan-first: what --cluster trains in).")] = None,
    clip_grad: Annotated[float | None, typer.Option(
        help="Clip gradients to this L2 norm of the whole model's gradient (across every stage and shard).")] = None,
    lr_schedule: Annotated[str, typer.Option(
        help="constant, or cosine / linear decay from --lr to --min-lr over the steps after --warmup.")] = "constant",
    warmup: Annotated[int, typer.Option(min=0, help="Steps of linear learning-rate warmup.")] = 0,
    min_lr: Annotated[float, typer.Option(min=0, help="Learning rate the decay ends at (--lr-schedule).")] = 0.0,
    tensorboard: Annotated[Path | None, typer.Option(
        help="Write loss, lr, step time, tokens/s and grad norm per step to TensorBoard event files here.")] = None,
    sync_batchnorm: Annotated[bool, typer.Option(
        help="Synchronise BatchNorm statistics over data-parallel replicas (else a warning names the layers).")] = False,
    plan_first: Annotated[str | None, typer.Option(
        help="Plan this model first (any reference, as --model), then run it.")] = None,
    cluster: Annotated[str, typer.Option(help="Cluster preset or file for --plan-first.")] = "cpu",
    nodes: Annotated[int | None, typer.Option(help="Cluster nodes for --plan-first.")] = None,
    gpus_per_node: Annotated[int | None, typer.Option(help="Devices per node for --plan-first.")] = None,
    global_batch: Annotated[int | None, typer.Option(help="Global batch size for --plan-first.")] = None,
) -> None:
    """Run a plan: torchrun workers on this node, progress from rank 0, then measured vs predicted."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from executor.launch import (
        RankFailed,
        RunSpec,
        WorkerError,
        check_launch,
        launch,
        read_report,
        slurm_launch,
    )
    from executor.sources import OptimizerSpec, resolve_data, resolve_model
    from executor.train import check_tensorboard
    from planner.strategy import Plan

    if (plan_path is None) == (plan_first is None):
        raise AutoparError("give a plan file or --plan-first MODEL (exactly one)")
    model_name = plan_first or model
    if model_name is None:
        raise AutoparError("which model does the plan train? add --model NAME (zoo name, path/to/file.py:factory or "
                           "package.module:factory)")
    from planner.precision import RUN_DTYPES
    from profiler.resolve import RefKind, parse_reference

    options = parse_options(option)
    ref = parse_reference(model_name, options)
    if ref.kind == RefKind.PROFILE:
        raise AutoparError(f"{model_name} is a file (a profile?), not a model a run can build; give the model "
                           "itself (zoo name, path/to/file.py:factory, package.module:factory or hf:path/to/config.json)")
    model_name = str(ref)  # file paths made absolute: the workers may start in another directory
    zoo_model = resolve_model(model_name, options)
    if plan_first is not None:
        import planner
        from api.cli_plan import cluster_spec

        if global_batch is None:
            raise AutoparError("--plan-first needs --global-batch N")
        # Plan for the processes this launch starts unless told otherwise.
        spec_cluster = cluster_spec(cluster, nodes=nodes or nnodes, gpus_per_node=gpus_per_node or nproc_per_node)
        plan = planner.plan(ref, spec_cluster, global_batch_size=global_batch, dtype=dtype)
        console.print(f"planned: {plan.strategy.describe()} in {plan.provenance.dtype.value}")
    else:
        try:
            plan = Plan.from_json(plan_path)
        except (OSError, ValueError) as exc:
            raise AutoparError(f"cannot read plan {plan_path}: {exc}") from None
    profile = _profile_for(ref, plan, dtype)
    run_dtype = RUN_DTYPES[profile.dtype]

    slurm = slurm_launch(os.environ)
    nnodes = nnodes or (slurm.nnodes if slurm else 1)
    if node_rank is None and slurm is not None:
        node_rank = slurm.node_rank
    if rdzv_endpoint is None and slurm is not None and nnodes > 1:
        rdzv_endpoint = slurm.master_host
    run_id = run_id or os.environ.get("SLURM_JOB_ID")
    world = plan.strategy.dims.world_size
    nproc = nproc_per_node or max(1, world // nnodes)
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_launch(plan, profile, nnodes=nnodes, nproc_per_node=nproc, cuda_devices=cuda)
    resolve_data(data, zoo_model, seed=seed)  # a --data spec that cannot be imported fails here, not in every rank

    with tempfile.TemporaryDirectory(prefix="autopar-run-") as tmp:
        report_path = report or Path(tmp) / "report.json"
        try:
            spec = RunSpec(
                plan=plan, profile=profile, model=model_name, model_options=options, data=data, steps=steps,
                seed=seed, optimizer=OptimizerSpec(name=optimizer, lr=lr), dtype=run_dtype, clip_grad=clip_grad,
                lr_schedule={"kind": lr_schedule, "warmup": warmup, "min_lr": min_lr},
                tensorboard=str(tensorboard) if tensorboard else None, sync_batchnorm=sync_batchnorm,
                save_dir=str(save_dir) if save_dir else None, save_every=save_every, resume=resume,
                resume_fallback=resume_fallback,
                report_path=str(report_path), collective_timeout_s=collective_timeout,
            )
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise AutoparError(f"invalid run options: {problems}") from None
        if tensorboard is not None:
            check_tensorboard()
        if resume and save_dir is None:
            raise AutoparError("--resume needs --save-dir (where the checkpoints are)")
        if resume_fallback and not resume:
            raise AutoparError("--resume-fallback only applies with --resume")
        console.print(f"launching {nnodes} x {nproc} processes: {plan.strategy.describe()} in {run_dtype}")
        try:
            launch(spec, nnodes=nnodes, nproc_per_node=nproc, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                   run_id=run_id, workdir=tmp)
        except WorkerError as exc:  # every rank stopped on it (loss diverged, damaged checkpoint): one line
            err_console.print("[bold red]error:[/]", escape(str(exc)), soft_wrap=True)
            sys.exit(1)
        except RankFailed as exc:
            err_console.print(f"[bold red]error:[/] rank {exc.rank} failed (exit code {exc.exitcode}); the job was stopped")
            sys.stderr.write(exc.message + "\n")
            sys.exit(1)
        except (KeyboardInterrupt, SignalException):
            err_console.print("[bold red]interrupted:[/] all ranks stopped")
            sys.exit(130)
        if Path(report_path).exists():
            _print_report(read_report(report_path), run_dtype)


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("run")(run_command)
