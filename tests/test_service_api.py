"""The planning service through its HTTP interface (FastAPI TestClient, real planner unless a test says otherwise)."""

from __future__ import annotations

import threading

import pytest
from service_support import (
    BlockingSearch,
    TestClient,
    make_app,
    profile_request,
    tiny_profile,
    zoo_request,
)

import planner
from planner.cluster import preset_names
from planner.strategy import ParallelDims, StageSpec, Strategy, ZeroStage


@pytest.fixture
def client(tmp_path):
    with TestClient(make_app(tmp_path / "plans.db")) as c:
        yield c


@pytest.fixture
def search_counter(monkeypatch):
    """Wraps the real planner.plan and counts how often the service calls it."""
    calls = []
    real = planner.plan

    def counting(*args, **kwargs):
        calls.append(kwargs.get("global_batch_size"))
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "plan", counting)
    return calls


def test_plan_is_created_fetched_listed_and_deleted(client):
    created = client.post("/v1/plans", json=zoo_request(8))
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["cached"] is False
    assert body["plan"]["strategy"]["dims"]["world_size"] == 4
    plan_id = body["id"]

    fetched = client.get(f"/v1/plans/{plan_id}")
    assert fetched.status_code == 200
    assert fetched.json()["plan"] == body["plan"]

    page = client.get("/v1/plans").json()
    assert [item["id"] for item in page["items"]] == [plan_id]
    assert page["total"] == 1 and page["items"][0]["model_name"] == "gpt-tiny"

    assert client.delete(f"/v1/plans/{plan_id}").status_code == 204
    gone = client.get(f"/v1/plans/{plan_id}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert client.delete(f"/v1/plans/{plan_id}").status_code == 404


def test_repeated_request_answers_the_stored_plan_without_searching(client, search_counter):
    first = client.post("/v1/plans", json=zoo_request(8))
    second = client.post("/v1/plans", json=zoo_request(8))
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["cached"] is True
    assert second.json()["id"] == first.json()["id"]
    assert second.json()["plan"] == first.json()["plan"]
    assert len(search_counter) == 1


def test_request_spelling_out_the_defaults_shares_the_cache_entry(client, search_counter):
    short = zoo_request(8)
    # gpt-tiny has 4 layers and hidden 64, the cpu preset one node: the same request after defaults.
    spelled = zoo_request(8, nodes=1, num_layers=4, hidden=64)
    first = client.post("/v1/plans", json=short).json()
    second = client.post("/v1/plans", json=spelled).json()
    assert second["cached"] is True and second["request_key"] == first["request_key"]
    assert len(search_counter) == 1


def test_a_different_batch_is_a_new_search(client, search_counter):
    a = client.post("/v1/plans", json=zoo_request(8)).json()
    b = client.post("/v1/plans", json=zoo_request(16)).json()
    assert a["id"] != b["id"] and not b["cached"]
    assert search_counter == [8, 16]


def test_plans_survive_a_restart_on_the_same_database(tmp_path, search_counter):
    db = tmp_path / "plans.db"
    with TestClient(make_app(db)) as before:
        created = before.post("/v1/plans", json=zoo_request(8)).json()
    with TestClient(make_app(db)) as after:
        fetched = after.get(f"/v1/plans/{created['id']}")
        again = after.post("/v1/plans", json=zoo_request(8)).json()
    assert fetched.status_code == 200 and fetched.json()["plan"] == created["plan"]
    assert again["cached"] is True and again["id"] == created["id"]
    assert len(search_counter) == 1


def test_list_is_newest_first_and_paginated(tmp_path, monkeypatch):
    monkeypatch.setattr(planner, "plan", BlockingSearch())
    with TestClient(make_app(tmp_path / "plans.db")) as c:
        ids = [c.post("/v1/plans", json=profile_request(batch=b)).json()["id"] for b in (4, 8, 12, 16, 20)]
        first = c.get("/v1/plans", params={"limit": 2}).json()
        last = c.get("/v1/plans", params={"limit": 2, "offset": 4}).json()
    assert [i["id"] for i in first["items"]] == ids[::-1][:2]
    assert first["total"] == 5 and first["next_offset"] == 2
    assert [i["id"] for i in last["items"]] == [ids[0]] and last["next_offset"] is None


def _bad(field: str, body: dict) -> tuple[str, dict]:
    return field, body


def _with(base: dict, path: list, value) -> dict:
    import copy

    body = copy.deepcopy(base)
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


_broken_profile = tiny_profile().model_dump(mode="json")
_broken_profile["cut_points"] = [9]


@pytest.mark.parametrize(
    ("field", "body"),
    [
        _bad("model.name", _with(zoo_request(), ["model", "name"], "gpt-5-ultra")),
        _bad("cluster.name", _with(zoo_request(), ["cluster", "name"], "tpu-pod")),
        _bad("cluster.name", _with(zoo_request(), ["cluster", "name"], "/etc/hosts")),
        _bad("global_batch_size", _with(zoo_request(), ["global_batch_size"], -8)),
        _bad("model.profile", _with(profile_request(), ["model", "profile"], _broken_profile)),
        _bad("model.profile.layers", _with(profile_request(), ["model", "profile", "layers"], "three")),
        _bad("model.options.num_layers", _with(zoo_request(), ["model", "options"], {"num_layers": 10**6})),
        _bad("model.options.heads", _with(zoo_request(), ["model", "options"], {"hidden": 64, "heads": 6})),
        _bad("model.profile_id", {**zoo_request(), "model": {"kind": "profile_id", "profile_id": "prof-missing"}}),
        _bad("model.kind", _with(zoo_request(), ["model", "kind"], "python")),
        _bad("model.import_path", _with(zoo_request(), ["model", "import_path"], "os:system")),
        _bad("cluster.nodes", _with(zoo_request(), ["cluster", "nodes"], 0)),
        _bad("options.time_limit_s", _with(zoo_request(), ["options", "time_limit_s"], -1)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_plan_body_gets_4xx_naming_the_field(client, field, body):
    response = client.post("/v1/plans", json=body)
    assert 400 <= response.status_code < 500, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["code"] and error["message"]


def test_invalid_json_and_oversized_body_name_the_body(tmp_path):
    with TestClient(make_app(tmp_path / "p.db", max_body_bytes=4096)) as c:
        broken = c.post("/v1/plans", content=b'{"model": ', headers={"content-type": "application/json"})
        huge = c.post("/v1/profiles", json=tiny_profile().model_dump(mode="json") | {"name": "x" * 5000})
        # Without Content-Length (chunked upload) the limit is enforced while the body streams in.
        streamed = c.post("/v1/profiles", content=iter([b"[" + b"0," * 1000] * 4 + [b"0]"]),
                          headers={"content-type": "application/json"})
    assert broken.status_code == 422 and broken.json()["error"]["field"] == "body"
    assert streamed.status_code == 413 and streamed.json()["error"]["field"] == "body"
    assert huge.status_code == 413 and huge.json()["error"] == {
        "code": "body_too_large", "message": huge.json()["error"]["message"], "field": "body"}


def test_cluster_over_the_world_size_limit_is_refused(tmp_path):
    with TestClient(make_app(tmp_path / "p.db", max_world_size=64)) as c:
        response = c.post("/v1/plans", json=zoo_request(8, nodes=17))  # 17 x 4 cpu workers
    assert response.status_code == 422 and response.json()["error"]["field"] == "cluster.nodes"


def test_api_key_is_required_when_configured(tmp_path):
    with TestClient(make_app(tmp_path / "p.db", api_keys=("s3cret",))) as c:
        missing = c.get("/v1/plans")
        wrong = c.get("/v1/plans", headers={"X-API-Key": "guess"})
        header = c.get("/v1/plans", headers={"X-API-Key": "s3cret"})
        bearer = c.get("/v1/clusters", headers={"Authorization": "Bearer s3cret"})
        health = c.get("/healthz")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    assert wrong.status_code == 401
    assert (header.status_code, bearer.status_code, health.status_code) == (200, 200, 200)


def test_planner_error_becomes_422_with_its_message(client, monkeypatch):
    def refuse(*_, **__):
        raise planner.AutoparError("no strategy fits in memory; use a larger cluster")

    monkeypatch.setattr(planner, "plan", refuse)
    response = client.post("/v1/plans", json=zoo_request(8))
    assert response.status_code == 422
    assert response.json()["error"]["message"] == "no strategy fits in memory; use a larger cluster"


def test_solver_time_limit_is_clamped_to_the_server_cap(tmp_path, monkeypatch):
    seen = {}
    fake = BlockingSearch()

    def capture(model, cluster, **kwargs):
        seen.update(kwargs)
        return fake(model, cluster, **kwargs)

    monkeypatch.setattr(planner, "plan", capture)
    with TestClient(make_app(tmp_path / "p.db", max_solver_seconds=3.0)) as c:
        c.post("/v1/plans", json=_with(profile_request(), ["options", "time_limit_s"], 3600))
    assert seen["time_limit_s"] == 3.0


def test_search_past_the_wall_clock_guard_answers_504(tmp_path, monkeypatch):
    search = BlockingSearch(block=True)
    monkeypatch.setattr(planner, "plan", search)
    try:
        with TestClient(make_app(tmp_path / "p.db", request_timeout_s=0.3)) as c:
            response = c.post("/v1/plans", json=profile_request())
    finally:
        search.release.set()
    assert response.status_code == 504 and response.json()["error"]["code"] == "search_timeout"


def test_searches_beyond_the_queue_bound_get_503(tmp_path, monkeypatch):
    search = BlockingSearch(block=True)
    monkeypatch.setattr(planner, "plan", search)
    results = {}
    with TestClient(make_app(tmp_path / "p.db", max_pending_searches=1)) as c:
        first = threading.Thread(target=lambda: results.update(a=c.post("/v1/plans", json=profile_request(batch=8))))
        first.start()
        assert search.started.wait(10)
        results["b"] = c.post("/v1/plans", json=profile_request(batch=16))
        search.release.set()
        first.join(10)
    assert results["b"].status_code == 503 and results["b"].json()["error"]["code"] == "busy"
    assert results["a"].status_code == 201


def test_uploaded_profile_is_fetched_and_plannable_by_id(client, search_counter):
    profile = tiny_profile()
    up = client.post("/v1/profiles", json=profile.model_dump(mode="json"))
    again = client.post("/v1/profiles", json=profile.model_dump(mode="json"))
    assert (up.status_code, again.status_code) == (201, 200)
    assert up.json()["id"] == again.json()["id"] and again.json()["created"] is False
    stored = client.get(f"/v1/profiles/{up.json()['id']}").json()["profile"]
    assert stored == profile.model_dump(mode="json")

    by_id = {**profile_request(profile), "model": {"kind": "profile_id", "profile_id": up.json()["id"]}}
    planned = client.post("/v1/plans", json=by_id)
    inline = client.post("/v1/plans", json=profile_request(profile))
    assert planned.status_code == 201, planned.text
    assert inline.json()["cached"] is True and inline.json()["id"] == planned.json()["id"]
    assert len(search_counter) == 1
    assert client.get("/v1/profiles/prof-nothing").status_code == 404


def test_evaluate_returns_the_cost_model_prediction_for_the_given_strategy(client):
    profile = tiny_profile()
    strategy = Strategy(dims=ParallelDims(dp=2, tp=1, pp=2, world_size=4), zero_stage=ZeroStage.OPTIMIZER,
                        micro_batch_size=2, num_micro_batches=4,
                        stages=[StageSpec(start=0, stop=2), StageSpec(start=2, stop=4)])
    body = {"model": {"kind": "profile", "profile": profile.model_dump(mode="json")},
            "cluster": {"kind": "preset", "name": "cpu"}, "strategy": strategy.model_dump(mode="json")}
    response = client.post("/v1/evaluate", json=body)
    assert response.status_code == 200, response.text
    expected = planner.evaluate(profile, planner.load_cluster("cpu"), strategy)
    assert response.json()["prediction"] == expected.model_dump(mode="json")

    wrong = dict(body, cluster={"kind": "preset", "name": "cpu", "nodes": 2})
    refused = client.post("/v1/evaluate", json=wrong)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "strategy.dims.world_size"


def test_clusters_lists_every_preset(client):
    names = [c["name"] for c in client.get("/v1/clusters").json()["presets"]]
    assert sorted(names) == preset_names()


def test_readyz_reports_the_schema_version(client):
    body = client.get("/readyz").json()
    assert body["status"] == "ready" and body["schema_version"] >= 1


def test_settings_from_env_read_keys_and_reject_bad_values():
    from api.settings import Settings, SettingsError

    env = {"AUTOPAR_API_KEYS": "a, b,", "AUTOPAR_MAX_SOLVER_SECONDS": "30", "AUTOPAR_DB_PATH": "/tmp/x.db"}
    settings = Settings.from_env(env)
    assert settings.api_keys == ("a", "b") and settings.max_solver_seconds == 30.0
    assert Settings.from_env({"AUTOPAR_API_KEYS": '["k1", "k2"]'}).api_keys == ("k1", "k2")
    with pytest.raises(SettingsError, match="search_workers"):
        Settings.from_env({"AUTOPAR_SEARCH_WORKERS": "0"})
