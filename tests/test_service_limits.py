"""Work limits of the service: abandoned requests stop their work, per-client concurrency, cached what-if answers."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from service_support import BlockingSearch, TestClient, make_app, profile_request, tiny_profile
from test_service_server import running_server

import planner
from planner.budget import PlanCancelled
from planner.strategy import ParallelDims, StageSpec, Strategy


class CancellableSearch:
    """Stands in for planner.plan: runs until the service sets the cancellation flag it was handed."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()

    def __call__(self, model, cluster, *, cancel=None, **_):
        self.started.set()
        if cancel is not None and cancel.wait(30):
            self.cancelled.set()
            raise PlanCancelled("stopped")
        raise TimeoutError("the service never cancelled this search")


def _evaluate_body() -> dict:
    profile = tiny_profile()
    strategy = Strategy(dims=ParallelDims(dp=4, tp=1, pp=1, world_size=4), micro_batch_size=2, num_micro_batches=1,
                        stages=[StageSpec(start=0, stop=profile.num_layers)])
    return {"model": {"kind": "profile", "profile": profile.model_dump(mode="json")},
            "cluster": {"kind": "preset", "name": "cpu"}, "strategy": strategy.model_dump(mode="json")}


def test_search_past_the_wall_clock_guard_gets_504_and_is_cancelled(tmp_path, monkeypatch):
    search = CancellableSearch()
    monkeypatch.setattr(planner, "plan", search)
    with TestClient(make_app(tmp_path / "plans.db", request_timeout_s=0.5)) as c:
        answer = c.post("/v1/plans", json=profile_request())
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "search_timeout"
        assert search.cancelled.wait(5), "the abandoned search kept running"
        assert c.app.state.ctx.runner.cancelled == 1


def test_search_whose_client_disconnects_is_cancelled(tmp_path, monkeypatch):
    search = CancellableSearch()
    monkeypatch.setattr(planner, "plan", search)
    with running_server(make_app(tmp_path / "plans.db")) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/plans", json=profile_request(), timeout=1.0)
        assert search.started.is_set()
        assert search.cancelled.wait(5), "the search went on after its client left"
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def test_one_client_cannot_start_more_searches_than_its_limit(tmp_path, monkeypatch):
    search = BlockingSearch(block=True)
    monkeypatch.setattr(planner, "plan", search)
    answers: dict[str, int] = {}
    with TestClient(make_app(tmp_path / "plans.db", max_searches_per_client=1)) as c:
        def ask(who: str, batch: int) -> None:
            answers[who] = c.post("/v1/plans", json=profile_request(batch=batch), headers={"X-API-Key": who}).status_code

        first = threading.Thread(target=ask, args=("alice", 8))
        first.start()
        assert search.started.wait(10)
        again = c.post("/v1/plans", json=profile_request(batch=16), headers={"X-API-Key": "alice"})
        other = threading.Thread(target=ask, args=("bob", 16))
        other.start()
        search.release.set()
        first.join(30)
        other.join(30)
    assert again.status_code == 429 and again.json()["error"]["code"] == "too_many_requests"
    assert again.headers["retry-after"] == "5"
    assert answers == {"alice": 201, "bob": 201}


def test_equal_evaluations_are_answered_from_the_cache(tmp_path, monkeypatch):
    calls = []
    real = planner.evaluate

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "evaluate", counting)
    with TestClient(make_app(tmp_path / "plans.db")) as c:
        first = c.post("/v1/evaluate", json=_evaluate_body())
        second = c.post("/v1/evaluate", json=_evaluate_body())
    assert (first.status_code, second.status_code) == (200, 200)
    assert (first.json()["cached"], second.json()["cached"]) == (False, True)
    assert second.json()["prediction"] == first.json()["prediction"]
    assert len(calls) == 1


def test_equal_evaluations_in_flight_share_one_evaluation(tmp_path, monkeypatch):
    release, started, calls = threading.Event(), threading.Event(), []
    real = planner.evaluate

    def slow(*args, **kwargs):
        calls.append(1)
        started.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "evaluate", slow)
    answers = []
    with TestClient(make_app(tmp_path / "plans.db")) as c:
        def ask() -> None:
            answers.append(c.post("/v1/evaluate", json=_evaluate_body()).json())

        threads = [threading.Thread(target=ask) for _ in range(3)]
        threads[0].start()
        assert started.wait(10)
        for t in threads[1:]:
            t.start()
        runner = c.app.state.ctx.runner
        deadline = time.monotonic() + 10
        # Release only once all three wait on the one job, so the later two cannot be cache hits.
        while sum(job.waiters for job in runner._inflight.values()) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sum(job.waiters for job in runner._inflight.values()) == 3
        release.set()
        for t in threads:
            t.join(30)
    assert len(calls) == 1
    assert sorted(a["cached"] for a in answers) == [False, True, True]
