"""`autopar plan` and `autopar show`.

    autopar plan gpt2-medium --cluster dgx-a100-80gb --nodes 2 --global-batch 512 --out plan.json
    autopar plan my.profile.json --cluster cluster.yaml --global-batch 64 --top-k 3 --chart plan.png
    autopar show plan.json --chart plan.png
    autopar plan gpt2-medium --cluster dgx-a100-80gb --global-batch 512 --server http://127.0.0.1:8000
    autopar plan my_model.py:build --cluster cpu --global-batch 16 --option width=64
    autopar plan hf:configs/llama/config.json --cluster dgx-h100 --global-batch 256 --seq-len 4096
    autopar plan gpt-tiny --cluster cpu --global-batch 16 --calibration .autopar/runs.db   # fitted to recorded runs
    autopar plan gpt-tiny --cluster cpu --gpus-per-node 2 --global-batch 8 --verify-top-k 2 --steps 5 --out plan.json

MODEL is any model reference (`profiler.resolve`: a zoo name, path/to/file.py:factory, package.module:factory,
hf:path/to/config.json, profiled on the meta device on the spot) or a profile JSON written by `autopar profile`.
It is profiled in --dtype, else in what the cluster trains in (bfloat16 on GPU presets, float32 on `cpu`); the plan
records that precision and `autopar run` trains in it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from planner.cluster import ClusterSpec, load_cluster
from planner.errors import AutoparError
from planner.planning import read_profile
from planner.strategy import Plan

console = Console()
GB = 1e9


def cluster_spec(name: str, **overrides: int | None) -> ClusterSpec:
    """`load_cluster`, with a file that cannot be read (a directory, no permission) reported as a one-line error."""
    try:
        return load_cluster(name, **overrides)
    except IsADirectoryError:
        raise AutoparError(f"--cluster {name} is a directory; give a preset name or a YAML/JSON cluster file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AutoparError(f"cannot read cluster file {name} ({exc}); give a preset name or a readable YAML/JSON "
                           "cluster file") from None


def _write(what: str, path: Path, write: object) -> object:
    """Run `write()`; a path that cannot be written becomes a one-line error naming it."""
    try:
        return write()  # type: ignore[operator]
    except IsADirectoryError:
        raise AutoparError(f"cannot write the {what} to {path}: it is a directory; give a file path") from None
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        raise AutoparError(f"cannot write the {what} to {path} ({reason}); give a path in a writable "
                           "directory") from None


def _positive(value: float) -> float:
    """Option callback: a number of seconds must be finite and above zero."""
    if not value > 0 or value == float("inf"):
        raise typer.BadParameter(f"{value} is not a positive number of seconds")
    return value


def _make_plan(model: str, cluster_name: str, *, nodes: int | None, gpus_per_node: int | None, global_batch: int,
               options: dict[str, object], dtype: str | None, profile_path: Path | None, top_k: int,
               time_limit: float, objective: str, calibration: str | None = None, api_key: str | None = None) -> Plan:
    """Plan in this process (the place a `--server URL` option would send the same request instead); with
    `calibration` (a run store file or service URL) on the cluster fitted to its recorded runs."""
    from planner import plan

    cluster = cluster_spec(cluster_name, nodes=nodes, gpus_per_node=gpus_per_node)
    fitted = None
    if calibration is not None:
        from api.cli_runs import fit_from, is_calibrated_file, print_fit

        fitted = fit_from(calibration, cluster, measured_links=is_calibrated_file(cluster_name), api_key=api_key)
        print_fit(fitted)
        cluster = fitted.cluster
    # A reference is profiled by `profiler.resolve` inside `plan` (torch is imported only then).
    return plan(str(profile_path or model), cluster, global_batch_size=global_batch, dtype=dtype,
                model_options=options or None, top_k=top_k, time_limit_s=time_limit, objective=objective,
                calibration=fitted.calibration if fitted is not None else None)


def _plan_on_server(server: str, api_key: str | None, model: str, cluster_name: str, *, nodes: int | None,
                    gpus_per_node: int | None, global_batch: int, options: dict[str, object], dtype: str | None,
                    profile_path: Path | None, top_k: int, time_limit: float, objective: str,
                    calibration: str | None = None) -> Plan:
    """The same request as `_make_plan`, answered by an `autopar serve` instance (stored and cached there)."""
    if calibration is not None and calibration.rstrip("/") != server.rstrip("/"):
        raise AutoparError(f"with --server the server fits to its own stored runs: give --calibration {server} "
                           "(or drop --server to fit to a local run store)")
    from api.client import Client
    from planner.cluster import PRESETS

    # Files are read here: the server only accepts zoo names, preset names and JSON data, never paths.
    cluster_arg: object = cluster_name if cluster_name in PRESETS else cluster_spec(cluster_name)
    if profile_path is not None or Path(model).suffix == ".json" or Path(model).exists():
        model_arg: object = read_profile(profile_path or model)
        if options:
            raise AutoparError(f"options ({', '.join(sorted(options))}) cannot change a finished profile; profile "
                               "the model again with them, or send a zoo name")
    else:
        model_arg = model
    with Client(server, api_key=api_key) as client:
        answer = client.plan(model_arg, cluster_arg, global_batch_size=global_batch, nodes=nodes,
                             gpus_per_node=gpus_per_node, objective=objective, top_k=top_k,
                             time_limit_s=time_limit, dtype=dtype, calibrated=calibration is not None, **options)
    console.print(f"[dim]plan {answer.id} from {server}{' (cached)' if answer.cached else ''}[/]")
    return answer.plan


def print_plan(plan: Plan) -> None:
    """Format a plan with rich: the choice, its prediction, per-rank memory and the alternatives."""
    s, p, prov = plan.strategy, plan.prediction, plan.provenance
    console.print(f"[bold]{plan.kind.value} parallelism[/]: {s.describe()}")
    console.print(plan.explanation)
    t = Table(title="prediction", show_header=False)
    t.add_row("step", f"{p.step_seconds:.4g} s")
    t.add_row("throughput", f"{p.samples_per_second:,.1f} samples/s, {p.tokens_per_second:,.0f} tokens/s")
    t.add_row("model FLOP/s per GPU", f"{p.model_flops_per_gpu / 1e12:.1f} TFLOP/s (MFU {p.mfu:.1%})")
    t.add_row("hardware FLOP/s per GPU", f"{p.hardware_flops_per_gpu / 1e12:.1f} TFLOP/s")
    tb = p.time
    t.add_row("time breakdown", f"compute {tb.compute:.4g} s, recompute {tb.recompute:.4g} s, bubble "
                                f"{tb.bubble:.4g} s, exposed comm {tb.exposed_comm:.4g} s, optimizer {tb.optimizer:.4g} s")
    for c in tb.comms:
        t.add_row(f"  {c.collective} ({c.axis.value})", f"{c.purpose}: {c.bytes / GB:.3g} GB, {c.seconds:.4g} s, "
                                                        f"{c.exposed_seconds:.4g} s exposed")
    console.print(t)
    mt = Table(title="memory per device (GB)")
    for col in ("rank", "layers", "params", "grads", "optimizer", "activations", "buffers", "runtime", "opt temps",
                "output", "total", "usable"):
        mt.add_column(col, justify="right")
    stages = s.stages
    for r, mb in enumerate(p.memory):
        held = [f"{st.start}-{st.stop - 1}" for i, st in enumerate(stages) if i % s.dims.pp == r]
        mt.add_row(str(r), ",".join(held), *(f"{x / GB:.2f}" for x in (
            mb.parameters, mb.gradients, mb.optimizer_state, mb.activations, mb.comm_buffers, mb.runtime,
            mb.optimizer_temporaries, mb.output_buffers, mb.total, mb.capacity)))
    console.print(mt)
    if plan.alternatives:
        at = Table(title="alternatives")
        for col in ("strategy", "step (s)", "reason"):
            at.add_column(col)
        for a in plan.alternatives:
            at.add_row(a.strategy.describe(), f"{a.prediction.step_seconds:.4g}", a.reason)
        console.print(at)
    precision = prov.dtype.value if prov.dtype is not None else "precision not recorded"
    console.print(f"[dim]{prov.model_name} (profile {prov.profile_hash}, {precision}) on {prov.cluster.name} "
                  f"{prov.cluster.nodes}x{prov.cluster.gpus_per_node}; planner {prov.planner_version}; "
                  f"{prov.candidates_evaluated} candidates in {prov.search_seconds:.2f} s; CP-SAT {prov.solver_status}[/]")
    if prov.calibration is not None:
        cal = prov.calibration
        factors = ", ".join(f"{k} {v:.3f}x" for k, v in cal.factors.items()) or "none"
        console.print(f"[dim]calibrated to {cal.runs} run(s) from {cal.source}: {factors}; median |log error| "
                      f"{cal.median_abs_log_error_before:.3f} -> {cal.median_abs_log_error_after:.3f}[/]")
    if prov.verification is not None:
        ver = prov.verification
        ran = "; ".join(f"{c.strategy}: " + ("failed" if c.measured_step_seconds is None else
                                             f"{c.measured_step_seconds * 1e3:.1f} ms measured")
                        + f", {c.predicted_step_seconds * 1e3:.1f} ms predicted" for c in ver.candidates)
        console.print(f"[dim]verified on {ver.world_size} processes, {ver.steps} steps each: {ran}[/]")


def register(app: typer.Typer) -> None:
    """Add `plan` and `show` to the CLI."""

    @app.command("plan")
    def plan_cmd(
        model: str = typer.Argument(..., help="Zoo name (e.g. gpt2-medium), path/to/file.py:factory, "
                                              "package.module:factory, hf:path/to/config.json or a profile JSON."),
        cluster: str = typer.Option(..., "--cluster", help="Preset name or a YAML/JSON cluster file."),
        global_batch: int = typer.Option(..., "--global-batch", min=1, help="Samples per optimizer step."),
        nodes: int | None = typer.Option(None, "--nodes", min=1, help="Override the cluster's node count."),
        gpus_per_node: int | None = typer.Option(None, "--gpus-per-node", min=1, help="Override GPUs per node."),
        seq_len: int | None = typer.Option(None, "--seq-len", min=1, help="Tokens per sample (a model option)."),
        option: list[str] = typer.Option([], "--option", help="Model option key=value (zoo config field, factory "
                                         "argument, Hugging Face config field; repeatable)."),
        dtype: str | None = typer.Option(None, "--dtype", help="Precision to profile the model in (default: what "
                                                               "the cluster trains in: bfloat16 on GPUs, float32 "
                                                               "on cpu)."),
        profile: Path | None = typer.Option(None, "--profile", help="Use this profile JSON for MODEL."),
        top_k: int = typer.Option(5, "--top-k", min=1, help="Alternatives to list."),
        time_limit: float = typer.Option(10.0, "--time-limit", callback=_positive,
                                         help="Search time budget in seconds (> 0)."),
        objective: str = typer.Option("throughput", "--objective", help="throughput or memory."),
        out: Path | None = typer.Option(None, "--out", help="Write the plan JSON here."),
        chart: Path | None = typer.Option(None, "--chart", help="Draw the timeline and memory bars (PNG)."),
        server: str | None = typer.Option(None, "--server", help="Ask an `autopar serve` URL instead of planning here."),
        calibration: str | None = typer.Option(
            None, "--calibration", help="Run store file or `autopar serve` URL: plan on the cluster fitted to its "
                                        "recorded runs of this cluster name (`autopar runs`)."),
        api_key: str | None = typer.Option(None, "--api-key", envvar="AUTOPAR_API_KEY",
                                           help="Key for --server; prefer AUTOPAR_API_KEY or --api-key-file, since "
                                                "a key on the command line shows in `ps`."),
        api_key_file: Path | None = typer.Option(None, "--api-key-file", help="Read the key for --server from this "
                                                                               "file (its first line)."),
        verify_top_k: int | None = typer.Option(
            None, "--verify-top-k", min=1, help="Run the K best candidates that fit for --steps steps on this node, "
                                                "record them, and keep the one measured fastest (api.verify)."),
        steps: int | None = typer.Option(None, "--steps", min=1, help="Steps of each --verify-top-k run (default 5)."),
        nproc_per_node: int | None = typer.Option(
            None, "--nproc-per-node", min=1, help="Processes --verify-top-k may start here (default: the cluster's "
                                                  "devices per node)."),
        records: Path | None = typer.Option(None, "--records", help="Run store for the --verify-top-k runs (default: "
                                                                   "$AUTOPAR_RUNS_DB, else ./.autopar/runs.db)."),
        no_record: bool = typer.Option(False, "--no-record", help="Do not record the --verify-top-k runs."),
    ) -> None:
        """Find the fastest data / tensor / pipeline parallel strategy that fits."""
        if api_key_file is not None:
            from api.settings import read_api_keys

            api_key = read_api_keys(api_key_file)[0]
        from api.cli_run import parse_options

        make = partial(_make_plan, api_key=api_key) if server is None else partial(_plan_on_server, server, api_key)
        options = parse_options(option) | ({"seq_len": seq_len} if seq_len is not None else {})
        if verify_top_k is None and (steps is not None or nproc_per_node is not None):
            raise AutoparError("--steps and --nproc-per-node apply to --verify-top-k K (the candidates to run); "
                               "add --verify-top-k or drop them")
        if verify_top_k is not None:
            from api.launching import runnable_reference

            runnable_reference(model, options)  # a profile JSON cannot be run: refused before planning
        result = make(model, cluster, nodes=nodes, gpus_per_node=gpus_per_node, global_batch=global_batch,
                      options=options, dtype=dtype, profile_path=profile, top_k=max(top_k, (verify_top_k or 0) + 1),
                      time_limit=time_limit, objective=objective, calibration=calibration)
        print_plan(result)
        if verify_top_k is not None:
            from api.verify import verify_model_plan

            result = verify_model_plan(result, model, options, dtype=dtype, top_k=verify_top_k, steps=steps or 5,
                                       nproc_per_node=nproc_per_node, records=records, no_record=no_record)
        if out is not None:
            _write("plan", out, lambda: result.to_json(out))
            console.print(f"plan written to {out}")
        if chart is not None:
            from planner.chart import draw_plan

            console.print(f"chart written to {_write('chart', chart, lambda: draw_plan(result, chart))}")

    @app.command("show")
    def show_cmd(
        plan_file: Path = typer.Argument(..., help="A plan JSON written by `autopar plan --out`."),
        chart: Path | None = typer.Option(None, "--chart", help="Draw the timeline and memory bars (PNG)."),
    ) -> None:
        """Print a saved plan again (and optionally draw it)."""
        if not plan_file.exists():
            raise AutoparError(f"plan file {plan_file} does not exist")
        if plan_file.is_dir():
            raise AutoparError(f"{plan_file} is a directory; give a plan JSON written by `autopar plan --out`")
        try:
            saved = Plan.from_json(plan_file)
        except (OSError, UnicodeDecodeError) as exc:
            raise AutoparError(f"cannot read plan file {plan_file} ({exc}); give a readable plan JSON") from None
        except ValueError as exc:
            raise AutoparError(f"{plan_file} is not a valid plan: {str(exc).splitlines()[0]}") from None
        print_plan(saved)
        if chart is not None:
            from planner.chart import draw_plan

            console.print(f"chart written to {_write('chart', chart, lambda: draw_plan(saved, chart))}")
