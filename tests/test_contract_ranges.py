"""Every number of a profile, cluster or plan is finite and physical; nothing invalid is stored or written."""

from __future__ import annotations

import copy
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from service_support import TestClient, make_app, profile_request, tiny_profile

from planner.cluster import PRESETS, ClusterSpec
from planner.model_profile import ModelProfile
from planner.strategy import CommCost, MeshAxis

REPO = Path(__file__).resolve().parents[1]


def _profile_json(**layer_fields: float) -> dict:
    data = tiny_profile().model_dump(mode="json")
    data["layers"][1].update(layer_fields)
    return data


def _rows(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_profile_with_infinite_flops_is_refused_naming_the_field():
    text = json.dumps(_profile_json(fwd_flops=float("inf")))
    assert "Infinity" in text
    with pytest.raises(ValidationError, match="fwd_flops is inf"):
        ModelProfile.model_validate_json(text)


@pytest.mark.parametrize("field,value", [("fwd_flops", 1e308), ("saved_activation_bytes", 1e300),
                                         ("bwd_flops", float("nan")), ("fwd_bytes", -1.0)])
def test_profile_numbers_outside_physical_range_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        ModelProfile.model_validate(_profile_json(**{field: value}))


def test_cluster_with_nan_peak_flops_is_refused_naming_the_field():
    data = copy.deepcopy(PRESETS["cpu"])
    data["device"]["peak_flops"]["float32"] = float("nan")
    with pytest.raises(ValidationError, match=r"peak_flops\[float32\] is nan"):
        ClusterSpec.model_validate(data)


@pytest.mark.parametrize("link", ["intra_node", "inter_node"])
def test_cluster_with_vanishing_bandwidth_is_refused_naming_the_field(link):
    data = copy.deepcopy(PRESETS["cpu"])
    data[link]["bandwidth"] = 1e-300
    with pytest.raises(ValidationError, match=r"bandwidth = 1e-300 is outside the physical range"):
        ClusterSpec.model_validate(data)


def test_every_preset_lies_within_the_physical_ranges():
    for name, data in PRESETS.items():
        assert ClusterSpec.model_validate(data).name == name


def test_plan_parts_refuse_infinite_numbers():
    with pytest.raises(ValidationError, match="seconds is inf"):
        CommCost(collective="all_reduce", axis=MeshAxis.DP, purpose="grads", bytes=1.0, seconds=float("inf"),
                 exposed_seconds=0.0)


def test_service_refuses_an_infinite_profile_and_stores_nothing(tmp_path):
    db = tmp_path / "plans.db"
    with TestClient(make_app(db)) as client:
        body = json.dumps(_profile_json(fwd_flops=float("inf")))
        response = client.post("/v1/profiles", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 422, response.text
        assert "fwd_flops" in response.text
        assert _rows(db, "profiles") == 0


@pytest.mark.parametrize("fields", [{"fwd_flops": 1e308}, {"saved_activation_bytes": 1e308}])
def test_service_refuses_an_overflowing_plan_request_and_stores_nothing(tmp_path, fields):
    db = tmp_path / "plans.db"
    with TestClient(make_app(db)) as client:
        request = profile_request()
        request["model"]["profile"] = _profile_json(**fields)
        for _ in range(2):  # the same request again is refused again, not served from a broken row
            response = client.post("/v1/plans", json=request)
            assert response.status_code == 422, response.text
        assert next(iter(fields)) in response.text
        assert _rows(db, "plans") == 0


def test_cli_plan_refuses_an_infinite_profile_in_one_line_and_writes_nothing(tmp_path):
    prof, out = tmp_path / "bad.profile.json", tmp_path / "plan.json"
    prof.write_text(json.dumps(_profile_json(fwd_flops=float("inf"))))
    r = subprocess.run([sys.executable, "-m", "api.cli", "plan", str(prof), "--cluster", "cpu", "--global-batch",
                        "8", "--out", str(out)], check=False, cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "fwd_flops" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert not out.exists()


def test_service_evaluate_refuses_a_micro_batch_that_would_overflow(tmp_path):
    strategy = {"dims": {"dp": 4, "tp": 1, "pp": 1, "world_size": 4}, "micro_batch_size": 10**306,
                "num_micro_batches": 1, "stages": [{"start": 0, "stop": 4}]}
    body = {"model": {"kind": "profile", "profile": tiny_profile().model_dump(mode="json")},
            "cluster": {"kind": "preset", "name": "cpu"}, "strategy": strategy}
    with TestClient(make_app(tmp_path / "plans.db")) as client:
        response = client.post("/v1/evaluate", json=body)
    assert response.status_code == 422, response.text
    assert "micro_batch_size" in response.text


@pytest.mark.parametrize("patch, word", [
    ({"fwd_flops": True}, "a number"),      # pydantic's lax mode would read true as 1.0
    ({"fwd_flops": "1e9"}, "a number"),     # ... and a numeric string as its number
    ({"param_count": False}, "a number"),
])
def test_contracts_refuse_what_lax_mode_would_coerce(patch, word):
    from planner.model_profile import LayerProfile

    base = dict(index=0, name="l", module_type="L", param_count=1, param_bytes=4, fwd_flops=1.0, bwd_flops=2.0,
                fwd_bytes=0.0, bwd_bytes=0.0, saved_activation_bytes=0.0, input_bytes=0.0, output_bytes=0.0)
    LayerProfile.model_validate(base)  # the unpatched layer is valid
    with pytest.raises(ValueError, match=word):
        LayerProfile.model_validate({**base, **patch})


def test_a_boolean_field_takes_only_true_or_false():
    from planner.cluster import load_cluster

    with pytest.raises(Exception, match="true or false"):
        load_cluster("cpu", overlap_dp_comm=0)
    assert load_cluster("cpu", overlap_dp_comm=True).overlap_dp_comm is True


def test_a_device_type_the_executor_cannot_run_is_refused():
    """Issue 11 finding 7: `device.type: "xla"` was accepted; the executor runs only cuda (NCCL) and cpu (gloo)."""
    from planner.cluster import ClusterError, load_cluster

    xla = {"name": "x", "type": "xla", "memory_bytes": 10**9, "peak_flops": {"float32": 1e12},
           "memory_bandwidth": 1e10}
    with pytest.raises(ClusterError, match="device.type: Input should be 'cuda' or 'cpu'"):
        load_cluster("cpu", device=xla)
    assert load_cluster("cpu", device={**xla, "type": "cpu"}).device.type == "cpu"
