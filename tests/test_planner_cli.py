"""`autopar plan` / `autopar show` end to end on a formula profile (no torch, no profiling)."""

from __future__ import annotations

from typer.testing import CliRunner

from api.cli import app
from planner.gpt_formula import gpt_profile
from planner.strategy import Plan


def test_plan_writes_a_plan_that_show_prints_and_charts(tmp_path):
    prof = tmp_path / "gpt.json"
    gpt_profile(num_layers=8, hidden=1024, heads=16, seq_len=1024, vocab_size=50257).to_json(prof)
    out, chart = tmp_path / "plan.json", tmp_path / "plan.png"
    runner = CliRunner()
    r = runner.invoke(app, ["plan", str(prof), "--cluster", "dgx-a100-40gb", "--nodes", "2", "--global-batch",
                               "64", "--top-k", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    saved = Plan.from_json(out)
    assert saved.kind.value in r.output and "alternatives" in r.output
    r = runner.invoke(app, ["show", str(out), "--chart", str(chart)])
    assert r.exit_code == 0, r.output
    assert saved.strategy.describe() in " ".join(r.output.split())  # rich may wrap the line anywhere
    assert chart.stat().st_size > 10_000


def test_show_refuses_a_file_that_is_not_a_plan(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a plan"}')
    r = CliRunner().invoke(app, ["show", str(bad)])
    # The CLI's error contract: exit 2, one line naming the problem, no traceback.
    assert r.exit_code == 2, r.output
    assert "not a valid plan" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1
