"""`autopar run`: launch a plan on this node's processes through torchrun, then report measured against predicted.

    autopar run plan.json --model gpt-tiny --steps 20 --nproc-per-node 2
    autopar run plan.json --model gpt-tiny --save-dir ckpt --save-every 10 --resume --report run.json
    autopar run plan.json --model gpt-tiny --save-dir ckpt --resume --resume-fallback   # skip a damaged checkpoint
    autopar run plan.json --model gpt-tiny --clip-grad 1.0 --lr-schedule cosine --warmup 100 --tensorboard tb/
    autopar run --plan-first gpt-tiny --cluster cpu --nodes 1 --global-batch 16 --nproc-per-node 4
    autopar run --plan-first examples/hf_gpt2.py:model --cluster cpu --global-batch 8 --nproc-per-node 2  # own model
    autopar run plan.json --model gpt2-medium --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29500   # each node
    srun --ntasks-per-node=1 autopar run plan.json --model gpt2-medium   # Slurm: nodes and ranks from the job
    autopar run plan.json --model gpt-tiny --steps 5 --records runs.db --server http://127.0.0.1:8000  # record it
    autopar run --plan-first gpt-tiny --cluster cpu --global-batch 8 --nproc-per-node 2 --verify-top-k 2  # fastest

--model / --plan-first take any model reference (`profiler.resolve`: a zoo name with --option key=value,
path/to/file.py:factory, package.module:factory, hf:path/to/config.json). The run trains in the plan's precision
(the one it was planned in) unless --dtype says otherwise; --plan-first plans in --dtype, else in what --cluster trains
in (`planner.precision.default_dtype`). Before any rank starts it refuses a world size that differs from the plan's,
a precision the plan was not made for (naming the --dtype that fits), a model whose profile hash differs from the
plan's, and a device type this node does not have. A finished run is recorded (measured next to predicted, see
`api.cli_runs`) in <save-dir>/autopar-runs.db, else ./.autopar/runs.db, unless --no-record; `autopar runs` lists them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from api.launching import launch_plan, make_spec, run_profile, runnable_reference
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
    cpu = report.memory_kind != "cuda_max_allocated"
    kind = "peak private RSS - start" if cpu else "peak allocated"
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
    records: Annotated[Path | None, typer.Option(
        help="Run store to record this run in (default: <save-dir>/autopar-runs.db, else ./.autopar/runs.db).")] = None,
    no_record: Annotated[bool, typer.Option("--no-record", help="Do not record the run in a local run store.")] = False,
    server: Annotated[str | None, typer.Option(
        help="Also store the run record in this `autopar serve` URL (key: AUTOPAR_API_KEY).")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="AUTOPAR_API_KEY", help="Key for --server.")] = None,
    plan_id: Annotated[str | None, typer.Option(help="Service id of the plan, to link the run record to it.")] = None,
    verify_top_k: Annotated[int | None, typer.Option(
        min=1, help="With --plan-first: first run the K best candidates that fit for --verify-steps steps each, "
        "record them, and train the one measured fastest.")] = None,
    verify_steps: Annotated[int, typer.Option(min=1, help="Steps of each --verify-top-k candidate.")] = 5,
) -> None:
    """Run a plan: torchrun workers on this node, progress from rank 0, then measured vs predicted."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from executor.launch import RankFailed, WorkerError, check_launch, slurm_launch
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

    if verify_top_k is not None and plan_first is None:
        raise AutoparError("--verify-top-k verifies the planner's candidates: use it with --plan-first MODEL (or "
                           "run `autopar plan MODEL ... --verify-top-k K --out plan.json` and run that plan)")
    options = parse_options(option)
    ref = runnable_reference(model_name, options)
    model_name = str(ref)  # file paths made absolute: the workers may start in another directory
    zoo_model = resolve_model(model_name, options)
    if plan_first is not None:
        import planner
        from api.cli_plan import cluster_spec

        if global_batch is None:
            raise AutoparError("--plan-first needs --global-batch N")
        # Plan for the processes this launch starts unless told otherwise.
        spec_cluster = cluster_spec(cluster, nodes=nodes or nnodes, gpus_per_node=gpus_per_node or nproc_per_node)
        plan = planner.plan(ref, spec_cluster, global_batch_size=global_batch, dtype=dtype,
                            top_k=max(5, (verify_top_k or 0) + 1))
        console.print(f"planned: {plan.strategy.describe()} in {plan.provenance.dtype.value}")
    else:
        try:
            plan = Plan.from_json(plan_path)
        except (OSError, ValueError) as exc:
            raise AutoparError(f"cannot read plan {plan_path}: {exc}") from None
    profile = run_profile(ref, plan, dtype)
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

    spec = make_spec(
        plan, profile, model=model_name, model_options=options, data=data, steps=steps,
        seed=seed, optimizer=OptimizerSpec(name=optimizer, lr=lr), dtype=run_dtype, clip_grad=clip_grad,
        lr_schedule={"kind": lr_schedule, "warmup": warmup, "min_lr": min_lr},
        tensorboard=str(tensorboard) if tensorboard else None, sync_batchnorm=sync_batchnorm,
        save_dir=str(save_dir) if save_dir else None, save_every=save_every, resume=resume,
        resume_fallback=resume_fallback,
        report_path=str(report) if report else None, collective_timeout_s=collective_timeout,
    )
    if tensorboard is not None:
        check_tensorboard()
    if resume and save_dir is None:
        raise AutoparError("--resume needs --save-dir (where the checkpoints are)")
    if resume_fallback and not resume:
        raise AutoparError("--resume-fallback only applies with --resume")
    if verify_top_k is not None:
        from api.verify import verify_candidates

        # The candidates train as the winner will (data, optimizer, precision), for --verify-steps steps.
        plan = verify_candidates(
            plan, profile, top_k=verify_top_k, steps=verify_steps, model=model_name, model_options=options,
            nproc_per_node=nproc, nnodes=nnodes, records=records, no_record=no_record, save_dir=save_dir,
            server=server, api_key=api_key, data=data, seed=seed, optimizer=OptimizerSpec(name=optimizer, lr=lr),
            dtype=run_dtype, clip_grad=clip_grad, sync_batchnorm=sync_batchnorm,
            collective_timeout_s=collective_timeout)
        spec = make_spec(plan, profile, **spec.model_dump(exclude={"plan", "profile"}))  # checked for the winner
    console.print(f"launching {nnodes} x {nproc} processes: {plan.strategy.describe()} in {run_dtype}")
    try:
        run_report = launch_plan(spec, nnodes=nnodes, nproc_per_node=nproc, node_rank=node_rank,
                                 rdzv_endpoint=rdzv_endpoint, run_id=run_id)
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
    if run_report is not None:
        _print_report(run_report, run_dtype)
        from api.cli_runs import record_run

        record_run(run_report, plan, profile, model=model_name, options=options, steps=steps,
                   nproc_per_node=nproc, nnodes=nnodes, save_dir=save_dir, records=records, no_record=no_record,
                   server=server, api_key=api_key, plan_id=plan_id)


def register(app: typer.Typer) -> None:
    """Add the command to the CLI."""
    app.command("run")(run_command)
