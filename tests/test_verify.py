"""`--verify-top-k` (issue 12 item 4): the best candidates really run, are recorded, and the plan is re-ranked by
what they measured. One real two-process verification, one single-process one (K above the candidates that fit),
the re-ranking on hand-made measurements, and the refusals that must launch nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import executor_support as sup
import pytest
from typer.testing import CliRunner

from api.cli import app
from api.run_store import RunStore
from api.verify import Trial, candidates, disagreements, verified_plan
from planner.strategy import Alternative, Plan

REPO = sup.REPO


def _autopar(*args: str, timeout: float) -> subprocess.CompletedProcess:
    # A wide terminal keeps rich from wrapping the table rows the test reads.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-c", "from api.cli import main; main()", *args], check=False,
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _table_rows(stdout: str) -> list[list[str]]:
    """The cells of the verification table's rows, in printed order."""
    lines = stdout[stdout.index("verification:"):].splitlines()
    return [[c.strip() for c in line.strip("│ ").split("│")] for line in lines if line.startswith("│")]


# -- the one real multi-process verification -------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_verify_top_2_runs_two_candidates_records_them_and_keeps_the_measured_faster(tmp_path):
    db, out = tmp_path / "runs.db", tmp_path / "plan.json"
    proc = _autopar("plan", "gpt-tiny", "--cluster", "cpu", "--gpus-per-node", "2", "--global-batch", "4",
                    "--time-limit", "5", "--verify-top-k", "2", "--steps", "3", "--records", str(db), "--out", str(out),
                    timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Exactly two runs launched and recorded, of two different strategies.
    records, total = RunStore(db, create=False).list()
    assert total == 2
    names = {r.plan.strategy.describe() for r in records}
    assert len(names) == 2
    assert all(r.settings.steps == 3 and r.settings.nproc_per_node == 2 for r in records)
    # One progress line as each starts and one as it ends.
    assert sum(line.startswith("verify ") and " for 3 steps" in line for line in proc.stdout.splitlines()) == 2
    assert sum(line.startswith("verify ") and " measured " in line for line in proc.stdout.splitlines()) == 2

    # The table is printed in the order of the measured step times, with ranks that say so.
    by_measured = sorted(records, key=lambda r: r.measured.step_seconds)
    rows = _table_rows(proc.stdout)
    assert [row[0] for row in rows] == [r.plan.strategy.describe() for r in by_measured]
    assert [row[5] for row in rows] == ["1", "2"]
    assert [float(row[2]) for row in rows] == [round(r.measured.step_seconds * 1e3, 1) for r in by_measured]

    # The written plan takes the measured faster one, with the model's own prediction for it.
    plan = Plan.from_json(out)
    winner = by_measured[0]
    assert plan.strategy.describe() == winner.plan.strategy.describe()
    assert plan.prediction.step_seconds == winner.predicted.step_seconds
    assert plan.alternatives[0].strategy.describe() == by_measured[1].plan.strategy.describe()
    assert "slower than the verified choice" in plan.alternatives[0].reason

    # Its provenance lists both candidates with the records' measured seconds and ids.
    ver = plan.provenance.verification
    assert ver is not None and ver.steps == 3 and ver.world_size == 2 and len(ver.candidates) == 2
    by_id = {r.id: r for r in records}
    assert {c.run_id for c in ver.candidates} == set(by_id)
    for c in ver.candidates:
        assert c.measured_step_seconds == by_id[c.run_id].measured.step_seconds
        assert c.predicted_step_seconds == by_id[c.run_id].predicted.step_seconds
        assert c.strategy == by_id[c.run_id].plan.strategy.describe()

    # A line where the two orders disagree, and only then.
    first = next(c for c in ver.candidates if c.predicted_rank == 1)
    disagreed = first.run_id != winner.id
    assert ("; measured " in proc.stdout) == disagreed
    assert ("agrees with the predicted order" in proc.stdout) == (not disagreed)


@pytest.mark.timeout(120)
def test_verify_top_k_above_the_candidates_that_fit_runs_those_there_are_and_says_so(tmp_path):
    db, out = tmp_path / "runs.db", tmp_path / "plan.json"
    # One device: the plan has a single candidate (no other degree group), so K=3 verifies one.
    proc = _autopar("plan", "gpt-tiny", "--cluster", "cpu", "--gpus-per-node", "1", "--global-batch", "2",
                    "--time-limit", "5", "--verify-top-k", "3", "--steps", "2", "--records", str(db), "--out", str(out),
                    timeout=100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "only 1 candidate(s) of the plan fit (asked for 3); verifying 1" in proc.stdout
    records, total = RunStore(db, create=False).list()
    assert total == 1
    ver = Plan.from_json(out).provenance.verification
    assert ver is not None and [c.run_id for c in ver.candidates] == [records[0].id]


# -- re-ranking on hand-made measurements ----------------------------------------------------------------------------


def _three_candidate_plan() -> Plan:
    """A 2-process gpt-tiny plan predicting DP 1 s, PP 2 s, TP 3 s, and a fourth (ZeRO-3, 4 s) that does not fit."""
    profile = sup.tiny_profile()
    plans = [sup.make_plan(sup.strategy(**kw), profile) for kw in
             ({"dp": 2}, {"pp": 2, "cuts": (3,)}, {"tp": 2}, {"dp": 2, "zero_stage": 3})]
    preds = [p.prediction.model_copy(update={"step_seconds": float(i + 1), "fits": i < 3}) for i, p in enumerate(plans)]
    alts = [Alternative(strategy=p.strategy, prediction=pr, reason=f"reason {i}")
            for i, (p, pr) in enumerate(zip(plans[1:], preds[1:], strict=True), 1)]
    return plans[0].model_copy(update={"prediction": preds[0], "alternatives": alts})


def test_candidates_are_the_plan_then_the_alternatives_that_fit_in_the_planners_order():
    plan = _three_candidate_plan()
    got = candidates(plan, 10)
    assert [c.prediction.step_seconds for c in got] == [1.0, 2.0, 3.0]  # the 4 s one does not fit
    assert [c.strategy for c in candidates(plan, 2)] == [plan.strategy, plan.alternatives[0].strategy]


def test_verified_plan_takes_the_measured_fastest_and_quotes_every_measurement():
    plan = _three_candidate_plan()
    c = candidates(plan, 3)
    # Measured: DP 3 s, PP 1 s, TP 2 s -- the reverse of what was predicted for DP and PP.
    trials = [Trial(c[0], 1, 3.0, "run-a"), Trial(c[1], 2, 1.0, "run-b"), Trial(c[2], 3, 2.0, "run-c")]
    out = verified_plan(plan, trials, steps=4, world_size=2)
    assert out.strategy == c[1].strategy and out.prediction.step_seconds == 2.0
    assert [a.strategy for a in out.alternatives[:2]] == [c[2].strategy, c[0].strategy]
    assert out.alternatives[0].reason.startswith("measured 100% slower than the verified choice (2000.0 vs 1000.0")
    assert out.alternatives[1].reason.startswith("measured 200% slower")
    assert out.alternatives[2].reason == "reason 3"  # the misfit is kept as the planner gave it
    assert "measured 3000.0 ms (200% slower" in out.explanation
    ver = out.provenance.verification
    assert [(v.predicted_rank, v.measured_step_seconds, v.run_id) for v in ver.candidates] == [
        (1, 3.0, "run-a"), (2, 1.0, "run-b"), (3, 2.0, "run-c")]
    # DP over PP and DP over TP were predicted the other way round; PP over TP agrees.
    lines = disagreements(trials)
    assert len(lines) == 2
    assert lines[0] == (f"predicted {c[0].strategy.describe()} 100% faster than {c[1].strategy.describe()}; "
                        f"measured {c[1].strategy.describe()} 200% faster")


def test_a_failed_candidate_is_ruled_out_and_named():
    plan = _three_candidate_plan()
    c = candidates(plan, 2)
    out = verified_plan(plan, [Trial(c[0], 1, failure="rank 1 failed"), Trial(c[1], 2, 5.0, "run-b")],
                        steps=2, world_size=2)
    assert out.strategy == c[1].strategy
    assert out.alternatives[0].strategy == c[0].strategy
    assert out.alternatives[0].reason == "failed when verified: rank 1 failed"
    assert "failed when run: rank 1 failed" in out.explanation
    with pytest.raises(ValueError, match="no verified candidate"):
        verified_plan(plan, [Trial(c[0], 1, failure="x")], steps=2, world_size=2)


# -- refusals: one line, exit 2, nothing launched --------------------------------------------------------------------


def _refused(result, tmp_path, *words: str) -> None:
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err, err
    assert not (tmp_path / "runs.db").exists()  # no run was recorded, so none was launched


def test_verify_refusals_are_one_line_with_exit_2_and_launch_nothing(tmp_path):
    db = str(tmp_path / "runs.db")
    base = ["plan", "gpt-tiny", "--cluster", "cpu", "--gpus-per-node", "2", "--global-batch", "4", "--records", db]
    runner = CliRunner()
    _refused(runner.invoke(app, [*base, "--verify-top-k", "0"]), tmp_path, "--verify-top-k")
    _refused(runner.invoke(app, [*base, "--steps", "3"]), tmp_path, "--verify-top-k")
    prof = tmp_path / "tiny.profile.json"
    prof.write_text(sup.tiny_profile().model_dump_json())
    _refused(runner.invoke(app, ["plan", str(prof), *base[2:], "--verify-top-k", "2"]), tmp_path, "profile",
             "give the model itself")
    _refused(runner.invoke(app, [*base, "--verify-top-k", "2", "--nproc-per-node", "1", "--time-limit", "2"]),
             tmp_path, "needs 2 processes", "--nproc-per-node 2")
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(json.loads(_three_candidate_plan().to_json())))
    _refused(runner.invoke(app, ["run", str(plan_file), "--model", "gpt-tiny", "--verify-top-k", "2",
                                 "--records", db]), tmp_path, "--plan-first")
