"""What if: the (cluster x GPU count) grid, losing nodes, and the service's /v1/whatif and /v1/plans/{id}/export.

The grid's derived columns are checked against the formulas of issue 13 applied to the cells' own tokens/s; each
cell's numbers against a direct `planner.plan` on the cluster the cell says it used.
"""

from __future__ import annotations

import json

import pytest
from service_support import TestClient, make_app, profile_request
from typer.testing import CliRunner

from api.cli import app
from planner import plan
from planner.cluster import load_cluster
from planner.gpt_formula import gpt_profile
from planner.whatif import CellStatus, WhatIf, whatif

CLUSTERS = ["dgx-a100-80gb", "dgx-h100"]
PRICES = {"dgx-a100-80gb": 2.0, "dgx-h100": 4.0}


@pytest.fixture(scope="module")
def small():
    """A 4-layer GPT written from the formula (no torch): plans in a fraction of a second per cell."""
    return gpt_profile(num_layers=4, hidden=256, heads=4, seq_len=128, vocab_size=1000)


@pytest.fixture(scope="module")
def grid(small) -> WhatIf:
    return whatif(small, [load_cluster(c) for c in CLUSTERS], [16, 4, 8], 32, price_per_gpu_hour=PRICES)


def _cells(result: dict) -> list[dict]:
    """The cells without their wall-clock seconds (which differ from run to run)."""
    return [{k: v for k, v in c.items() if k != "plan_seconds"} for c in result["cells"]]


def test_grid_efficiency_and_cost_follow_from_each_cells_tokens_per_second(grid, small):
    assert [(c.cluster, c.gpus) for c in grid.cells] == [(c, n) for c in CLUSTERS for n in (4, 8, 16)]
    assert all(c.status == CellStatus.OK for c in grid.cells)
    # 8-GPU nodes: 4 GPUs is half of one node, 8 one node, 16 two nodes.
    assert [(c.nodes, c.gpus_per_node) for c in grid.cells[:3]] == [(1, 4), (1, 8), (2, 8)]
    for c in grid.cells:
        base = grid.cell(c.cluster, 4)
        assert c.scaling_baseline_gpus == 4
        assert c.scaling_efficiency == pytest.approx((c.tokens_per_second / c.gpus) / (base.tokens_per_second / 4))
        price = PRICES[c.cluster]
        assert c.cost_per_million_tokens == pytest.approx(price * c.gpus / 3600 / c.tokens_per_second * 1e6)
        # The cell is the plan of the cluster it names: the same search on that shape gives the same numbers.
        direct = plan(small, load_cluster(c.cluster, nodes=c.nodes, gpus_per_node=c.gpus_per_node),
                      global_batch_size=32, top_k=1, time_limit_s=grid.cell_time_limit_s)
        assert c.strategy == direct.strategy.describe()
        assert c.step_seconds == pytest.approx(direct.prediction.step_seconds)
        assert c.peak_memory_bytes == pytest.approx(max(m.total for m in direct.prediction.memory))
        assert c.tokens_per_second == pytest.approx(32 * 128 / c.step_seconds)
    assert json.loads(grid.model_dump_json())["cells"][0]["status"] == "ok"


def test_a_cell_that_does_not_fit_or_split_into_nodes_says_why_while_the_others_plan():
    big = gpt_profile(num_layers=24, hidden=4096, heads=32, seq_len=1024, vocab_size=50257)  # ~5e9 parameters
    result = whatif(big, [load_cluster("dgx-a100-80gb")], [1, 8, 12], 64)
    one, eight, twelve = result.cells
    # 16 bytes of training state per parameter is ~80 GB: more than one 80 GB device holds.
    assert one.status == CellStatus.NO_PLAN and "fits" in one.reason and one.step_seconds is None
    assert eight.status == CellStatus.OK and eight.tokens_per_second > 0
    assert eight.scaling_baseline_gpus == 8 and eight.scaling_efficiency == 1.0
    assert twelve.status == CellStatus.INVALID and "multiple of 8" in twelve.reason and twelve.nodes is None


def test_cli_table_json_and_chart_match_the_python_call(grid, small, tmp_path):
    profile = tmp_path / "small.json"
    small.to_json(profile)
    out, chart = tmp_path / "w.json", tmp_path / "w.png"
    r = CliRunner().invoke(app, ["whatif", str(profile), "--global-batch", "32", "--cluster", ",".join(CLUSTERS),
                                 "--gpus", "4,8,16", "--price-per-gpu-hour", "dgx-a100-80gb=2,dgx-h100=4",
                                 "--json", str(out), "--chart", str(chart)])
    assert r.exit_code == 0, r.output
    assert _cells(json.loads(out.read_text())) == _cells(grid.model_dump(mode="json"))
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One progress line per cell, then the table.
    assert sum(1 for line in r.stdout.splitlines() if " GPUs (" in line) == 6
    assert "scaling" in r.stdout


def _plan_file(tmp_path, *argv: str) -> str:
    path = tmp_path / "plan.json"
    r = CliRunner().invoke(app, ["plan", *argv, "--time-limit", "2", "--out", str(path)])
    assert r.exit_code == 0, r.output
    return str(path)


def test_lose_nodes_replans_the_zoo_model_on_fewer_gpus_at_the_same_global_batch(tmp_path):
    # gpt-tiny on two 4-worker cpu nodes; the re-plan profiles the model again from the plan's provenance.
    plan_path = _plan_file(tmp_path, "gpt-tiny", "--cluster", "cpu", "--nodes", "2", "--global-batch", "16",
                           "--option", "seq_len=64")
    out = tmp_path / "loss.json"
    r = CliRunner().invoke(app, ["whatif", "--plan", plan_path, "--lose-nodes", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    loss = json.loads(out.read_text())
    before, after = loss["before"], loss["after"]
    assert before["provenance"]["cluster"]["nodes"] == 2 and after["provenance"]["cluster"]["nodes"] == 1
    assert after["strategy"]["dims"]["world_size"] == 4
    assert after["provenance"]["profile_hash"] == before["provenance"]["profile_hash"]
    gb = [s["micro_batch_size"] * s["num_micro_batches"] * s["dims"]["dp"] for s in (before["strategy"],
                                                                                  after["strategy"])]
    assert gb == [16, 16]
    assert "slowdown" in r.stdout and "warning" not in r.stdout


@pytest.mark.parametrize("argv, words", [
    (lambda p: ["--plan", p, "--lose-nodes", "2"], "below 2"),
    (lambda p: ["--lose-nodes", "1"], "go together"),
    (lambda p: ["--plan", p, "--lose-nodes", "1", "--gpus", "8"], "drop --gpus"),
    (lambda p: [p, "--global-batch", "8", "--cluster", "dgx-h100", "--gpus", "8,x"], "comma-separated"),
    (lambda p: [p, "--global-batch", "8", "--cluster", "dgx-h200", "--gpus", "8"], "unknown cluster preset"),
    (lambda p: [p, "--global-batch", "8", "--cluster", "dgx-h100", "--gpus", "8",
                "--price-per-gpu-hour", "dgx-a100-80gb=2"], "not in --cluster"),
    (lambda p: ["gpt-tiny", "--global-batch", "8", "--cluster", "cpu,dgx-h100", "--gpus", "4"], "--dtype"),
    (lambda p: ["gpt-tiny", "--cluster", "cpu", "--gpus", "4"], "missing --global-batch"),
])
def test_whatif_mistakes_are_one_line_and_exit_code_2(tmp_path, small, argv, words):
    profile = tmp_path / "small.json"
    small.to_json(profile)
    two_nodes = _plan_file(tmp_path, str(profile), "--cluster", "dgx-a100-80gb", "--nodes", "2",
                           "--global-batch", "16") if "--plan" in argv("P") else str(profile)
    r = CliRunner().invoke(app, ["whatif", *argv(two_nodes)])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], r.stderr


@pytest.fixture
def client(tmp_path):
    with TestClient(make_app(tmp_path / "plans.db")) as c:
        yield c


def test_service_whatif_answers_the_same_cells_as_the_python_call(client, grid, small):
    stored = client.post("/v1/profiles", json=small.model_dump(mode="json"))
    assert stored.status_code == 201, stored.text
    body = {"model": {"kind": "profile_id", "profile_id": stored.json()["id"]}, "clusters": CLUSTERS,
            "gpus": [4, 8, 16], "global_batch_size": 32, "price_per_gpu_hour": PRICES}
    r = client.post("/v1/whatif", json=body)
    assert r.status_code == 200, r.text
    assert _cells(r.json()) == _cells(grid.model_dump(mode="json"))
    assert r.json()["profile_hash"] == small.profile_hash


@pytest.mark.parametrize("change, status, code", [
    ({"clusters": ["dgx-a100-40gb", "dgx-a100-80gb", "dgx-h100"], "gpus": list(range(1, 12))}, 422,
     "grid_too_large"),
    ({"model": {"kind": "zoo", "name": "tests/user_models.py:build"}}, 422, "unknown_model"),
    ({"model": {"kind": "profile", "profile": {}}}, 422, "validation_error"),
    ({"clusters": ["clusters/mine.yaml"]}, 422, "unknown_cluster"),
    ({"gpus": [8192]}, 422, "cluster_too_large"),
], ids=["33 cells", "code reference", "inline profile", "cluster path", "world size"])
def test_service_whatif_refuses_large_grids_code_and_paths(tmp_path, change, status, code):
    with TestClient(make_app(tmp_path / "plans.db", max_world_size=4096)) as c:
        body = {"model": {"kind": "zoo", "name": "gpt-tiny"}, "clusters": ["dgx-h100"], "gpus": [8],
                "global_batch_size": 8} | change
        r = c.post("/v1/whatif", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


@pytest.mark.parametrize("target, fmt", [("deepspeed", None), ("torchtitan", "toml")])
def test_service_export_returns_the_text_autopar_export_writes(client, tmp_path, target, fmt):
    created = client.post("/v1/plans", json=profile_request(batch=8))
    assert created.status_code == 201, created.text
    plan_id = created.json()["id"]
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(json.dumps(created.json()["plan"]))
    r = client.post(f"/v1/plans/{plan_id}/export", json={"target": target} | ({"format": fmt} if fmt else {}))
    assert r.status_code == 200, r.text
    cli = CliRunner().invoke(app, ["export", str(plan_path), "--to", target, *(["--format", fmt] if fmt else [])])
    assert cli.exit_code == 0, cli.output
    assert r.json()["text"] == cli.stdout
    assert r.json()["warnings"] == [line.split(": ", 2)[2] for line in cli.stderr.splitlines()]
    assert r.json()["file_name"].endswith({"deepspeed": ".json", "torchtitan": ".toml"}[target])


def test_service_export_answers_404_for_an_unknown_plan_and_422_for_an_unknown_target(client):
    plan_id = client.post("/v1/plans", json=profile_request(batch=8)).json()["id"]
    missing = client.post("/v1/plans/no-such-plan/export", json={"target": "deepspeed"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    unknown = client.post(f"/v1/plans/{plan_id}/export", json={"target": "colossalai"})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "target"
    wrong_format = client.post(f"/v1/plans/{plan_id}/export", json={"target": "deepspeed", "format": "toml"})
    assert wrong_format.status_code == 422 and wrong_format.json()["error"]["code"] == "invalid_export"
