"""Storage stays bounded: profiles can be deleted, old and excess records are pruned, the profile cache is LRU."""

from __future__ import annotations

import os
import sqlite3
import time

from service_support import BlockingSearch, TestClient, make_app, tiny_profile

import planner
from api.storage import MIGRATIONS, PlanRow, Storage
from profiler import cache as profile_cache


def _stored_ref_request(profile_id: str, batch: int = 8) -> dict:
    return {"model": {"kind": "profile_id", "profile_id": profile_id}, "cluster": {"kind": "preset", "name": "cpu"},
            "global_batch_size": batch, "options": {"time_limit_s": 2.0, "top_k": 2}}


def test_profile_in_use_is_refused_then_deleted_with_cascade(tmp_path, monkeypatch):
    monkeypatch.setattr(planner, "plan", BlockingSearch())
    with TestClient(make_app(tmp_path / "plans.db")) as c:
        pid = c.post("/v1/profiles", json=tiny_profile().model_dump(mode="json")).json()["id"]
        plan_id = c.post("/v1/plans", json=_stored_ref_request(pid)).json()["id"]
        refused = c.delete(f"/v1/profiles/{pid}")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "profile_in_use"
        assert "1 stored plan" in refused.json()["error"]["message"] and "cascade=true" in refused.json()["error"][
            "message"]
        assert c.get(f"/v1/profiles/{pid}").status_code == 200 and c.get(f"/v1/plans/{plan_id}").status_code == 200
        assert c.delete(f"/v1/profiles/{pid}", params={"cascade": "true"}).status_code == 204
        assert c.get(f"/v1/profiles/{pid}").status_code == 404
        assert c.get(f"/v1/plans/{plan_id}").status_code == 404
        assert c.delete(f"/v1/profiles/{pid}").status_code == 404


def test_unused_profile_is_deleted_without_cascade(tmp_path):
    with TestClient(make_app(tmp_path / "plans.db")) as c:
        pid = c.post("/v1/profiles", json=tiny_profile().model_dump(mode="json")).json()["id"]
        assert c.delete(f"/v1/profiles/{pid}").status_code == 204
        assert c.get(f"/v1/profiles/{pid}").status_code == 404


def test_size_cap_prunes_the_oldest_uploads_and_keeps_the_newest(tmp_path):
    profiles = [tiny_profile(f"model-{i}") for i in range(6)]
    size = len(profiles[0].model_dump_json())
    with TestClient(make_app(tmp_path / "plans.db", max_stored_bytes=int(2.5 * size))) as c:
        ids = [c.post("/v1/profiles", json=p.model_dump(mode="json")).json()["id"] for p in profiles]
        kept = [pid for pid in ids if c.get(f"/v1/profiles/{pid}").status_code == 200]
        stored = c.app.state.ctx.storage.stored_bytes()
    assert kept == ids[-2:]
    assert stored <= 2.5 * size


def _plan_row(plan_id: str, created_at: float, profile: str | None) -> PlanRow:
    model = {"profile": profile} if profile else {"zoo": "gpt-tiny"}
    return PlanRow(id=plan_id, request_key=plan_id, created_at=created_at, model_name="m", cluster_name="c",
                   world_size=4, summary="dp=4", step_seconds=1.0, request=f'{{"model": {_json(model)}}}', body="{}")


def _json(obj) -> str:
    import json

    return json.dumps(obj)


def test_age_pruning_removes_old_plans_and_unused_profiles_only(tmp_path):
    storage = Storage(tmp_path / "a.db")
    now = time.time()
    storage.insert_profile("prof-old-unused", "m", "{}")
    storage.insert_profile("prof-old-used", "m", "{}")
    with sqlite3.connect(tmp_path / "a.db") as conn:
        conn.execute("UPDATE profiles SET created_at = ?", (now - 10 * 86400,))
    storage.insert_plan(_plan_row("old-plan", now - 10 * 86400, None))
    storage.insert_plan(_plan_row("new-plan", now, "prof-old-used"))
    pruned = storage.prune(max_age_s=86400, now=now)
    assert (pruned.plans, pruned.profiles) == (1, 1)
    assert storage.get_plan("old-plan") is None and storage.get_plan("new-plan") is not None
    # The old profile a recent plan uses stays until that plan goes.
    assert storage.get_profile("prof-old-unused") is None and storage.get_profile("prof-old-used") is not None


def test_migration_records_which_profile_existing_plans_use(tmp_path):
    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO profiles VALUES ('prof-a', 'm', 1.0, '{}')")
        conn.execute("INSERT INTO plans (id, request_key, created_at, model_name, cluster_name, world_size, summary, "
                     "step_seconds, request, body) VALUES ('p', 'k', 1.0, 'm', 'c', 4, 's', 1.0, "
                     "'{\"model\": {\"profile\": \"prof-a\"}}', '{}')")
    storage = Storage(path)
    assert storage.plans_using_profile("prof-a") == 1
    assert storage.delete_profile("prof-a") == (True, -1)


def test_profile_cache_evicts_least_recently_used_entries_past_its_cap(tmp_path):
    profiles = {k: tiny_profile(f"m{k}") for k in "abc"}
    size = len(profiles["a"].model_dump_json(indent=2)) + 64
    for stamp, key in enumerate("ab"):
        profile_cache.store(tmp_path, key, profiles[key], max_bytes=10 * size)
        os.utime(tmp_path / f"{key}.profile.json", ns=(stamp * 10**9, stamp * 10**9))
    assert profile_cache.load(tmp_path, "a") is not None  # a hit: "a" is now the most recently used
    first = (tmp_path / "a.profile.json").stat().st_size
    profile_cache.store(tmp_path, "c", profiles["c"], max_bytes=2 * first + first // 2)
    assert sorted(p.name for p in tmp_path.glob("*.profile.json")) == ["a.profile.json", "c.profile.json"]
