"""Run records (planner.run_record, api.run_store, /v1/runs, `autopar runs` / `compare`) and fitting to them
(planner.run_fit, `autopar plan --calibration`, the service's `calibrated` option).

Synthetic runs are "measured" by `evaluate` on a cluster whose factors the test sets (compute efficiency x0.7,
intra-node bandwidth x0.5), so the fit has a known answer; one real `autopar run` checks the record it writes.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_support as sup
from service_support import TestClient, make_app, profile_request, tiny_profile

from api import cli_runs
from api.cli import app
from api.client import Client
from api.run_store import RunStore, RunStoreError
from planner import evaluate
from planner.cluster import ClusterSpec, load_cluster
from planner.gpt_formula import gpt_profile
from planner.model_profile import ModelProfile
from planner.run_fit import FitSample, apply_factors, fit_runs
from planner.run_record import (
    Measured,
    Predicted,
    RankMeasurement,
    RunRecord,
    RunSettings,
    RunVersions,
    derive_errors,
)
from planner.strategy import ParallelDims, Plan, Provenance, StageSpec, Strategy, ZeroStage

TRUTH = {"compute_efficiency": 0.7, "intra_node.bandwidth": 0.5}


def _strategy(profile: ModelProfile, dp: int, tp: int, pp: int, mb: int, m: int, zero: int = 0) -> Strategy:
    n = profile.num_layers
    stages = ([StageSpec(start=0, stop=n)] if pp == 1 else
              [StageSpec(start=i * n // pp, stop=(i + 1) * n // pp) for i in range(pp)])
    return Strategy(dims=ParallelDims(dp=dp, tp=tp, pp=pp, world_size=dp * tp * pp), micro_batch_size=mb,
                    num_micro_batches=m, zero_stage=ZeroStage(zero), stages=stages)


def _record(profile: ModelProfile, prior: ClusterSpec, strategy: Strategy, measured_seconds: float, i: int,
            profile_id: str | None = None) -> RunRecord:
    """A record of `strategy` planned on `prior` whose measured step time is `measured_seconds`."""
    pred = evaluate(profile, prior, strategy)
    plan = Plan(kind=strategy.kind, strategy=strategy, prediction=pred, explanation="synthetic run",
                provenance=Provenance(model_name=profile.name, profile_hash=profile.profile_hash, cluster=prior,
                                      planner_version="test", search_seconds=0.0, solver_status="OPTIMAL",
                                      candidates_evaluated=1, dtype=profile.dtype))
    ranks = [RankMeasurement(rank=r, pp_rank=r // (strategy.dims.world_size // strategy.dims.pp), peak_bytes=3 << 20,
                             start_bytes=1 << 20, predicted_bytes=pred.memory[0].total)
             for r in range(strategy.dims.world_size)]
    measured = Measured(step_seconds=measured_seconds, per_step_seconds=[2 * measured_seconds, measured_seconds],
                        tokens_per_second=1000.0, memory_kind="cpu_peak_rss", memory=ranks)
    predicted = Predicted(step_seconds=pred.step_seconds, time=pred.time,
                          memory_bytes=[r.predicted_bytes for r in ranks])
    settings = RunSettings(steps=2, dtype=profile.dtype, nproc_per_node=prior.gpus_per_node, nnodes=prior.nodes,
                           global_batch_size=strategy.global_batch_size, device_type=prior.device.type)
    return RunRecord(id=f"run-synthetic-{i}", created=datetime.now(timezone.utc), plan=plan, profile_id=profile_id,
                     model=profile.name, settings=settings,
                     versions=RunVersions(planner="test", torch="test", python="3", host="test"),
                     measured=measured, predicted=predicted, errors=derive_errors(measured, predicted))


def _synthetic(profile: ModelProfile, prior: ClusterSpec, strategies: list[Strategy], truth: dict[str, float],
               profile_id: str | None = None) -> list[FitSample]:
    true_cluster = apply_factors(prior, truth)
    return [FitSample(_record(profile, prior, s, evaluate(profile, true_cluster, s).step_seconds, i, profile_id),
                      profile) for i, s in enumerate(strategies)]


def _gpt() -> ModelProfile:
    return gpt_profile(num_layers=8, hidden=1024, heads=16, seq_len=1024, vocab_size=32000, dtype="bfloat16")


def _two_node_runs(profile: ModelProfile, prior: ClusterSpec) -> list[Strategy]:
    """DP, TP, PP and their mixes over 2 x 8 devices (ZeRO-3 among them)."""
    return [_strategy(profile, 16, 1, 1, 1, 2), _strategy(profile, 2, 8, 1, 4, 2), _strategy(profile, 1, 8, 2, 4, 4),
            _strategy(profile, 8, 2, 1, 2, 2, zero=3), _strategy(profile, 4, 2, 2, 2, 4),
            _strategy(profile, 8, 1, 2, 1, 4)]


def _cpu_runs(profile: ModelProfile, truth: dict[str, float] = TRUTH, profile_id: str | None = None
              ) -> list[FitSample]:
    cpu = load_cluster("cpu")
    return _synthetic(profile, cpu, [_strategy(profile, 4, 1, 1, 2, 1), _strategy(profile, 2, 1, 2, 1, 4),
                                     _strategy(profile, 1, 1, 4, 1, 8), _strategy(profile, 4, 1, 1, 8, 1)],
                      truth, profile_id)


# -- fitting ---------------------------------------------------------------------------------------------------------


def test_fit_recovers_known_compute_and_intra_node_factors_from_dp_tp_pp_runs_over_two_nodes():
    profile, prior = _gpt(), load_cluster("dgx-a100-80gb", nodes=2)
    fit = fit_runs(_synthetic(profile, prior, _two_node_runs(profile, prior), TRUTH), prior, source="synthetic")
    assert fit.calibration.factors["compute_efficiency"] == pytest.approx(0.7, rel=0.02)
    assert fit.calibration.factors["intra_node.bandwidth"] == pytest.approx(0.5, rel=0.02)
    assert fit.cluster.compute_efficiency == pytest.approx(0.7 * prior.compute_efficiency, rel=0.02)
    assert fit.cluster.intra_node.bandwidth == pytest.approx(0.5 * prior.intra_node.bandwidth, rel=0.02)
    # The prior is 15-30% off on these runs; the fitted cluster explains them.
    assert fit.calibration.median_abs_log_error_before > 0.1
    assert fit.calibration.max_abs_log_error_after < 0.01
    assert fit.calibration.runs == 6


def test_fit_leaves_inter_node_bandwidth_at_its_prior_when_no_run_crossed_nodes():
    profile, prior = _gpt(), load_cluster("dgx-a100-80gb")  # one node of 8
    runs = [_strategy(profile, 8, 1, 1, 1, 2), _strategy(profile, 1, 8, 1, 4, 2), _strategy(profile, 2, 4, 1, 2, 2),
            _strategy(profile, 4, 1, 2, 1, 4), _strategy(profile, 2, 2, 2, 2, 4, zero=3)]
    fit = fit_runs(_synthetic(profile, prior, runs, TRUTH), prior, source="synthetic")
    assert "inter_node.bandwidth" in fit.calibration.at_prior
    assert "inter_node.bandwidth" not in fit.calibration.factors
    assert "not identifiable" in fit.reasons["inter_node.bandwidth"]
    assert fit.cluster.inter_node.bandwidth == prior.inter_node.bandwidth
    assert fit.calibration.factors["compute_efficiency"] == pytest.approx(0.7, rel=0.02)


def test_fit_stops_at_physical_bounds_and_says_so():
    profile, prior = _gpt(), load_cluster("dgx-a100-80gb", nodes=2)
    strategies = _two_node_runs(profile, prior)
    # Runs "measured" 4x faster than the datasheet allows: no efficiency above 1, no link above nominal.
    samples = [FitSample(_record(profile, prior, s, evaluate(profile, prior, s).step_seconds / 4, i), profile)
               for i, s in enumerate(strategies)]
    fit = fit_runs(samples, prior, source="synthetic")
    assert fit.cluster.compute_efficiency <= 1.0
    assert fit.cluster.intra_node.bandwidth <= prior.intra_node.bandwidth
    assert fit.cluster.inter_node.bandwidth <= prior.inter_node.bandwidth
    assert "compute_efficiency" in fit.calibration.at_bound
    assert "physical bound" in fit.reasons["compute_efficiency"]
    # A calibrated cluster file's measured bandwidths may rise, but only up to the headroom (2x).
    measured = fit_runs(samples, prior, source="synthetic", measured_links=True)
    assert measured.cluster.intra_node.bandwidth <= 2.0 * prior.intra_node.bandwidth * (1 + 1e-9)
    assert measured.cluster.compute_efficiency <= 1.0


# -- the local store and the CLI -------------------------------------------------------------------------------------


def test_record_round_trips_through_the_local_store_and_is_listed_and_compared_by_the_cli(tmp_path, monkeypatch):
    profile = tiny_profile()
    samples = _cpu_runs(profile)
    db = tmp_path / "runs.db"
    store = RunStore(db)
    for s in samples:
        store.add(s.record, s.profile)
    back = RunStore(db, create=False).get(samples[1].record.id)
    assert back == samples[1].record
    again, missing = store.fit_samples("cpu")
    assert len(again) == 4 and not missing and again[0].profile == profile  # the profile is stored once, by hash
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM profiles").fetchone()[0] == 1

    monkeypatch.setattr(cli_runs, "console", Console(width=250))
    listed = CliRunner().invoke(app, ["runs", "--records", str(db), "--limit", "3"])
    assert listed.exit_code == 0, listed.output
    assert "3 of 4 recorded run(s)" in listed.output
    newest = samples[-1].record
    assert newest.id in listed.output and f"{newest.errors.step_time_ratio:.2f}x" in listed.output
    shown = CliRunner().invoke(app, ["compare", samples[0].record.id, "--records", str(db)])
    assert shown.exit_code == 0, shown.output
    rec = samples[0].record
    step_row = next(line for line in shown.output.splitlines() if "step time (ms)" in line)
    assert f"{rec.measured.step_seconds * 1e3:.1f}" in step_row
    assert f"{rec.predicted.step_seconds * 1e3:.1f}" in step_row
    assert "rank 3 (pp 0) peak RSS - start MiB" in shown.output and "2.0" in shown.output  # 3 MiB peak - 1 MiB start
    missing_run = CliRunner().invoke(app, ["compare", "run-nothing", "--records", str(db)])
    assert missing_run.exit_code == 2 and "no run 'run-nothing'" in missing_run.output


def test_a_locked_or_unwritable_store_is_a_one_line_error(tmp_path):
    record = _cpu_runs(tiny_profile())[0].record
    with pytest.raises(RunStoreError, match="cannot open run store"):
        RunStore(tmp_path)  # a directory
    db = tmp_path / "runs.db"
    RunStore(db)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(RunStoreError, match="locked") as err:
            RunStore(db, busy_timeout_s=0.1).add(record)
        assert "\n" not in str(err.value)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    RunStore(db).add(record)  # nothing half-written by the failed attempt
    assert RunStore(db).list()[1] == 1


def test_plan_with_calibration_says_so_in_its_provenance(tmp_path):
    profile = tiny_profile()
    db = tmp_path / "runs.db"
    store = RunStore(db)
    for s in _cpu_runs(profile):
        store.add(s.record, s.profile)
    prof_path, out = tmp_path / "tiny.profile.json", tmp_path / "plan.json"
    prof_path.write_text(profile.model_dump_json())
    r = CliRunner().invoke(app, ["plan", str(prof_path), "--cluster", "cpu", "--global-batch", "8", "--time-limit",
                                 "2", "--calibration", str(db), "--out", str(out)])
    assert r.exit_code == 0, r.output
    plan = Plan.from_json(out)
    cal = plan.provenance.calibration
    assert cal is not None and cal.source == str(db) and cal.runs == 4
    assert cal.factors["compute_efficiency"] == pytest.approx(0.7, rel=0.02)
    assert plan.provenance.cluster.compute_efficiency == pytest.approx(0.7, rel=0.02)  # cpu preset: 1.0 x 0.7
    plain = CliRunner().invoke(app, ["plan", str(prof_path), "--cluster", "cpu", "--global-batch", "8",
                                     "--time-limit", "2", "--out", str(out)])
    assert plain.exit_code == 0 and Plan.from_json(out).provenance.calibration is None
    wrong = CliRunner().invoke(app, ["plan", str(prof_path), "--cluster", "dgx-a100-80gb", "--global-batch", "8",
                                     "--calibration", str(db)])
    assert wrong.exit_code == 2 and "no recorded run of cluster 'dgx-a100-80gb'" in wrong.output


# -- the service -----------------------------------------------------------------------------------------------------


def test_record_round_trips_through_the_service_and_a_calibrated_plan_fits_its_runs(tmp_path):
    profile = tiny_profile()
    calibrated = profile_request(batch=8)
    calibrated["options"]["calibrated"] = True
    with TestClient(make_app(tmp_path / "plans.db")) as c:
        none_yet = c.post("/v1/plans", json=calibrated)
        assert none_yet.status_code == 422 and none_yet.json()["error"]["code"] == "no_runs"
        pid = c.post("/v1/profiles", json=profile.model_dump(mode="json")).json()["id"]
        samples = _cpu_runs(profile, profile_id=pid)
        for s in samples:
            posted = c.post("/v1/runs", content=s.record.model_dump_json())
            assert posted.status_code == 201 and posted.json()["plan_linked"] is False
        made = c.post("/v1/plans", json=calibrated)
        assert made.status_code == 201, made.text
        plan_id, cal = made.json()["id"], made.json()["plan"]["provenance"]["calibration"]
        assert cal["runs"] == 4 and cal["factors"]["compute_efficiency"] == pytest.approx(0.7, rel=0.02)

        linked = samples[0].record.model_copy(update={"id": "run-linked", "plan_id": plan_id})
        assert c.post("/v1/runs", content=linked.model_dump_json()).json()["plan_linked"] is True
        unknown = c.post("/v1/runs", content=linked.model_copy(update={"id": "run-x", "plan_id": "nope"})
                         .model_dump_json())
        assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "plan_id"
        assert c.post("/v1/runs", content=linked.model_dump_json()).status_code == 409
        assert c.post("/v1/runs", content=b'{"id": "x"}').status_code == 422

        of_plan = c.get("/v1/runs", params={"plan_id": plan_id}).json()
        of_cpu = c.get("/v1/runs", params={"cluster": "cpu", "limit": 2}).json()
        elsewhere = c.get("/v1/runs", params={"cluster": "dgx-h100"}).json()
        fetched = c.get("/v1/runs/run-linked")
        assert c.get("/v1/runs/run-none").status_code == 404
        client = Client("http://testserver")  # the Python client `autopar run --server` and `autopar runs` use
        client._http = c
        client.post_run(linked.model_copy(update={"id": "run-by-client", "plan_id": None}))
        assert client.get_run("run-by-client").measured == linked.measured
        assert client.list_runs(cluster="cpu", limit=1).total == 6
    assert [i["id"] for i in of_plan["items"]] == ["run-linked"]
    assert of_cpu["total"] == 5 and of_cpu["next_offset"] == 2 and of_cpu["items"][0]["id"] == "run-linked"
    assert elsewhere["total"] == 0
    assert RunRecord.model_validate(fetched.json()["record"]) == linked


# -- one real run ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_autopar_run_records_the_measured_step_time_of_its_report(tmp_path):
    report, db = tmp_path / "report.json", tmp_path / "runs.db"
    proc = sup.autopar_run("--plan-first", "gpt-tiny", "--cluster", "cpu", "--nodes", "1", "--gpus-per-node", "1",
                           "--global-batch", "2", "--nproc-per-node", "1", "--steps", "3", "--report", str(report),
                           "--records", str(db), timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(report.read_text())
    records, total = RunStore(db, create=False).list()
    assert total == 1
    record = records[0]
    assert f"recorded run {record.id} in {db}" in proc.stdout
    assert record.measured.step_seconds == written["measured_step_seconds"]
    assert record.measured.per_step_seconds == [s["seconds"] for s in written["steps"]]
    assert record.predicted.step_seconds == written["predicted_step_seconds"]
    assert record.settings.steps == 3 and record.settings.nproc_per_node == 1 and record.model == "gpt-tiny"
    assert record.measured.memory_kind == "cpu_peak_private" and len(record.measured.memory) == 1
    samples, missing = RunStore(db).fit_samples(record.cluster_name)
    assert len(samples) == 1 and not missing  # its profile was kept, so the run can be fitted to
