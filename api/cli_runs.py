"""`autopar runs` and `autopar compare`: the recorded runs, measured against predicted.

    autopar run plan.json --model gpt-tiny --steps 20 --nproc-per-node 2   # records into ./.autopar/runs.db
    autopar runs                                                           # every recorded run, newest first
    autopar runs --records ckpt/autopar-runs.db --plan-id 3f2c... --limit 5
    autopar runs --server http://127.0.0.1:8000 --cluster cpu
    autopar compare run-0123abcd                                           # one run's measured-vs-predicted table
    autopar plan gpt-tiny --cluster cpu --global-batch 16 --calibration .autopar/runs.db   # plan on the fitted cluster

`autopar run` records every finished run (`record_run`, below) in `<save-dir>/autopar-runs.db`, else in
./.autopar/runs.db (--records PATH elsewhere, --no-record not at all), and with --server URL also stores it in the
service (uploading its profile, so the service can refit to it). `fit_from` is what `autopar plan --calibration`
calls: the runs of the plan's cluster from a store file or a service URL, fitted by `planner.run_fit`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from api.run_store import FALLBACK_STORE, STORE_ENV, RunStore, default_store_path, fallback_store
from planner.cluster import ClusterSpec
from planner.errors import AutoparError
from planner.run_fit import FitSample, RunFit, fit_runs
from planner.run_record import RunRecord, used_bytes

console = Console()

#: The first line of a cluster file `autopar calibrate` wrote (planner.cluster_fit.provenance_lines).
CALIBRATED_MARK = "# Written by `autopar calibrate`"


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def record_run(report: Any, plan: Any, profile: Any, *, model: str, options: dict[str, Any], steps: int,
               nproc_per_node: int, nnodes: int, save_dir: Path | None, records: Path | None, no_record: bool,
               server: str | None, api_key: str | None, plan_id: str | None) -> RunRecord | None:
    """After `autopar run`: build the run's record and store it locally (unless `no_record`) and on `server`.

    Called once the report is printed (and written with --report), so a store that fails loses no measurement:
    it raises AutoparError with one line naming the file and the fix."""
    import torch

    from planner.planning import PLANNER_VERSION
    from planner.run_record import current_versions, record_from_report

    if no_record and server is None:
        return None
    try:
        record = record_from_report(report, plan, model=model, model_options=options, steps=steps,
                                    dtype=profile.dtype, nproc_per_node=nproc_per_node, nnodes=nnodes,
                                    versions=current_versions(torch.__version__, PLANNER_VERSION), plan_id=plan_id)
    except ValueError as exc:
        raise AutoparError(f"the run was not recorded: {exc}") from None
    if not no_record:
        path = records or default_store_path(save_dir)
        RunStore(path).add(record, profile)
        console.print(f"recorded run {record.id} in {path}", soft_wrap=True)
    if server is not None:
        from api.client import Client

        with Client(server, api_key=api_key) as client:
            profile_id = client.upload_profile(profile).id
            record = record.model_copy(update={"profile_id": profile_id})
            client.post_run(record)
        console.print(f"recorded run {record.id} on {server}", soft_wrap=True)
    return record


def _records(source: str, *, plan_id: str | None, cluster: str | None, limit: int,
             api_key: str | None) -> tuple[list[RunRecord], int]:
    if _is_url(source):
        from api.client import Client

        with Client(source, api_key=api_key) as client:
            page = client.list_runs(plan_id=plan_id, cluster=cluster, limit=limit)
            return [client.get_run(item.id) for item in page.items], page.total
    return RunStore(source, create=False).list(plan_id=plan_id, cluster_name=cluster, limit=limit)


def fit_from(source: str, prior: ClusterSpec, *, measured_links: bool = False, api_key: str | None = None) -> RunFit:
    """Fit `prior` to the recorded runs of its name in a run store file or an `autopar serve` URL."""
    samples: list[FitSample] = []
    if _is_url(source):
        from api.client import Client

        with Client(source, api_key=api_key) as client:
            page = client.list_runs(cluster=prior.name, limit=1000)
            profiles: dict[str, Any] = {}
            for item in page.items:
                record = client.get_run(item.id)
                if record.profile_id and record.profile_id not in profiles:
                    profiles[record.profile_id] = client.get_profile(record.profile_id)
                if record.profile_id:
                    samples.append(FitSample(record, profiles[record.profile_id]))
    else:
        samples, _ = RunStore(source, create=False).fit_samples(prior.name)
    return fit_runs(samples, prior, source=source, measured_links=measured_links)


def is_calibrated_file(cluster: str) -> bool:
    """Whether `cluster` names a cluster file `autopar calibrate` wrote (its bandwidths were measured)."""
    path = Path(cluster)
    try:
        return path.is_file() and path.read_text().startswith(CALIBRATED_MARK)
    except (OSError, UnicodeDecodeError):
        return False


def print_fit(fit: RunFit) -> None:
    """The factors a calibration fitted, what it left, and the residuals before and after."""
    cal = fit.calibration
    t = Table(title=f"calibration: {cal.runs} run(s) from {cal.source}")
    t.add_column("parameter")
    t.add_column("fitted / prior", justify="right")
    t.add_column("note")
    for name, factor in cal.factors.items():
        t.add_row(name, f"{factor:.3f}x", fit.reasons.get(name, ""))
    for name in cal.at_prior:
        t.add_row(name, "-", fit.reasons.get(name, "left at its prior"))
    console.print(t)
    console.print(f"median |log error| {cal.median_abs_log_error_before:.3f} -> {cal.median_abs_log_error_after:.3f}, "
                  f"max {cal.max_abs_log_error_before:.3f} -> {cal.max_abs_log_error_after:.3f}")
    if fit.skipped:
        console.print(f"[dim]skipped: {'; '.join(fit.skipped)}[/]")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def print_compare(record: RunRecord) -> None:
    """One run's measured-vs-predicted table: step time and its predicted parts, then per-rank memory."""
    s = record.settings
    console.print(f"[bold]{record.id}[/] {record.model} on {record.cluster_name} ({s.nnodes} x {s.nproc_per_node}, "
                  f"{s.dtype.value}): {record.plan.strategy.describe()}")
    console.print(f"[dim]{record.created.isoformat()} plan {record.plan_id or '-'}; profile {record.profile_hash}; "
                  f"planner {record.versions.planner}, torch {record.versions.torch}, python {record.versions.python}"
                  f", host {record.versions.host}[/]")
    t = Table(title="measured vs predicted")
    for col, justify in (("quantity", "left"), ("measured", "right"), ("predicted", "right"), ("ratio", "right")):
        t.add_column(col, justify=justify)  # type: ignore[arg-type]
    m, p = record.measured, record.predicted
    t.add_row("step time (ms)", _ms(m.step_seconds), _ms(p.step_seconds), f"{record.errors.step_time_ratio:.2f}x")
    tb = p.time
    for label, value in (("compute", tb.compute), ("recompute", tb.recompute), ("pipeline bubble", tb.bubble),
                         ("exposed communication", tb.exposed_comm), ("optimizer", tb.optimizer)):
        t.add_row(f"  {label} (ms)", "-", _ms(value), "-")
    t.add_row("step time min / max (ms)", f"{_ms(min(m.per_step_seconds))} / {_ms(max(m.per_step_seconds))}", "-", "-")
    t.add_row("tokens/s", f"{m.tokens_per_second:,.0f}", f"{record.plan.prediction.tokens_per_second:,.0f}", "-")
    what = {"cpu_peak_rss": "peak RSS - start", "cpu_peak_private": "peak private RSS - start"}.get(
        m.memory_kind, "peak allocated")
    for rank, ratio in zip(m.memory, record.errors.memory_ratio):
        pred = "-" if rank.predicted_bytes is None else f"{rank.predicted_bytes / 2**20:,.1f}"
        t.add_row(f"rank {rank.rank} (pp {rank.pp_rank}) {what} MiB",
                  f"{used_bytes(rank, m.memory_kind) / 2**20:,.1f}", pred, "-" if ratio is None else f"{ratio:.2f}x")
    console.print(t)


SourceOption = Annotated[str | None, typer.Option(
    "--records", help=f"Run store file (default: ${STORE_ENV} if set, else {FALLBACK_STORE}; `autopar run "
                      "--save-dir D` writes D/autopar-runs.db).")]
ServerOption = Annotated[str | None, typer.Option("--server", help="Read the runs an `autopar serve` URL stores.")]
KeyOption = Annotated[str | None, typer.Option("--api-key", envvar="AUTOPAR_API_KEY", help="Key for --server.")]


def _source(records: str | None, server: str | None) -> str:
    if records is not None and server is not None:
        raise AutoparError("give --records PATH or --server URL, not both")
    return server or records or str(fallback_store())


def runs_command(
    records: SourceOption = None, server: ServerOption = None, api_key: KeyOption = None,
    plan_id: Annotated[str | None, typer.Option("--plan-id", help="Only runs of this service plan id.")] = None,
    cluster: Annotated[str | None, typer.Option("--cluster", help="Only runs on this cluster name.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="Runs to list (newest first).")] = 20,
) -> None:
    """List recorded runs with measured and predicted step time and their ratio."""
    found, total = _records(_source(records, server), plan_id=plan_id, cluster=cluster, limit=limit, api_key=api_key)
    t = Table(title=f"{len(found)} of {total} recorded run(s)")
    for col in ("run", "created (UTC)", "model", "cluster", "strategy", "measured ms", "predicted ms", "ratio"):
        t.add_column(col, justify="right" if col.endswith(("ms", "ratio")) else "left")
    for r in found:
        t.add_row(r.id, r.created.strftime("%Y-%m-%d %H:%M:%S"), r.model, r.cluster_name, r.plan.strategy.describe(),
                  _ms(r.measured.step_seconds), _ms(r.predicted.step_seconds), f"{r.errors.step_time_ratio:.2f}x")
    console.print(t)


def compare_command(
    run: Annotated[str, typer.Argument(help="Run id (or the start of one) from `autopar runs`.")],
    records: SourceOption = None, server: ServerOption = None, api_key: KeyOption = None,
) -> None:
    """Print one run's measured-vs-predicted table: step time and its predicted parts, per-rank memory."""
    source = _source(records, server)
    if _is_url(source):
        from api.client import Client

        with Client(source, api_key=api_key) as client:
            record = client.get_run(run)
    else:
        record = RunStore(source, create=False).get(run)
    print_compare(record)


def register(app: typer.Typer) -> None:
    """Add `runs` and `compare` to the CLI."""
    app.command("runs")(runs_command)
    app.command("compare")(compare_command)
