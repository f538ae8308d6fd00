"""The service under a real uvicorn on a loopback port, driven by `api.client.Client`."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from service_support import BlockingSearch, make_app, tiny_profile

import planner
from api.client import Client, ServiceError
from planner.strategy import ParallelDims, StageSpec, Strategy


@contextmanager
def running_server(app, timeout_s: float = 20.0) -> Iterator[str]:
    """Serve `app` on a free 127.0.0.1 port in a thread; stop it (and check it stopped) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # the OS picks a free port; handing uvicorn the bound socket avoids a race
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def test_fifty_concurrent_plan_requests_all_succeed(tmp_path, monkeypatch):
    searches = Counter()
    real = planner.plan

    def counting(*args, **kwargs):
        searches[kwargs["global_batch_size"]] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "plan", counting)
    batches = [8, 16, 24, 32, 40] * 10
    with running_server(make_app(tmp_path / "plans.db")) as url, Client(url, timeout_s=120) as client:
        def ask(batch: int):
            return client.plan("gpt-tiny", "cpu", global_batch_size=batch, time_limit_s=2.0, top_k=2,
                               dtype="float32")

        with ThreadPoolExecutor(max_workers=25) as pool:
            answers = list(pool.map(ask, batches))
        page = client.list_plans(limit=100)
    ids = {}
    for batch, answer in zip(batches, answers):
        assert answer.plan.strategy.global_batch_size == batch
        ids.setdefault(batch, set()).add(answer.id)
    # Equal requests share one stored plan and one search (single flight, then the store).
    assert all(len(group) == 1 for group in ids.values())
    assert searches == Counter({b: 1 for b in set(batches)})
    assert page.total == 5


def test_healthz_answers_while_a_search_runs(tmp_path, monkeypatch):
    search = BlockingSearch(block=True)
    monkeypatch.setattr(planner, "plan", search)
    result = {}
    with running_server(make_app(tmp_path / "plans.db")) as url, Client(url) as client:
        worker = threading.Thread(
            target=lambda: result.update(plan=client.plan(tiny_profile(), "cpu", global_batch_size=8))
        )
        worker.start()
        try:
            assert search.started.wait(20)
            started = time.perf_counter()
            health = httpx.get(f"{url}/healthz", timeout=5)
            answered_in = time.perf_counter() - started
        finally:
            search.release.set()
            worker.join(30)
    assert health.status_code == 200 and answered_in < 5
    assert result["plan"].cached is False


def test_client_covers_the_whole_api(tmp_path):
    profile = tiny_profile()
    strategy = Strategy(dims=ParallelDims(dp=4, tp=1, pp=1, world_size=4), micro_batch_size=2,
                        num_micro_batches=1, stages=[StageSpec(start=0, stop=profile.num_layers)])
    with running_server(make_app(tmp_path / "plans.db", api_keys=("k",))) as url:
        with Client(url) as anonymous, pytest.raises(ServiceError) as refused:
            anonymous.list_plans()
        with Client(url, api_key="k") as client:
            stored = client.upload_profile(profile)
            assert client.get_profile(stored.id) == profile
            answer = client.plan(stored.id, "cpu", global_batch_size=8, time_limit_s=2.0)
            assert client.get_plan(answer.id).plan == answer.plan
            assert [p.id for p in client.list_plans().items] == [answer.id]
            prediction = client.evaluate(profile, "cpu", strategy)
            assert prediction == planner.evaluate(profile, planner.load_cluster("cpu"), strategy)
            assert {c.name for c in client.clusters()} == set(planner.preset_names())
            client.delete_plan(answer.id)
            with pytest.raises(ServiceError) as missing:
                client.get_plan(answer.id)
            with pytest.raises(ServiceError) as bad_preset:
                client.plan(profile, "no-such-cluster", global_batch_size=8)
    assert refused.value.status == 401
    assert missing.value.status == 404
    assert bad_preset.value.status == 422 and bad_preset.value.field == "cluster.name"


def test_cli_plan_with_server_writes_the_servers_plan(tmp_path):
    from typer.testing import CliRunner

    from api.cli import app

    out = tmp_path / "plan.json"
    with running_server(make_app(tmp_path / "plans.db")) as url:
        args = ["plan", "gpt-tiny", "--cluster", "cpu", "--global-batch", "8", "--time-limit", "2",
                "--dtype", "float32", "--server", url, "--out", str(out)]
        first = CliRunner().invoke(app, args)
        second = CliRunner().invoke(app, args)
        with Client(url) as client:
            stored = client.list_plans().items
            served = client.get_plan(stored[0].id).plan
    assert first.exit_code == 0, first.output
    assert len(stored) == 1 and "(cached)" in second.output and "(cached)" not in first.output
    assert planner.Plan.from_json(out) == served


def test_a_slow_request_body_is_validated_off_the_event_loop(tmp_path, monkeypatch):
    """Issue 11: validating a multi-MiB profile took most of a second on the event loop, so a few at once stalled
    every request. Bodies are now validated in a worker thread: with validation made to take 1.5 s, /healthz still
    answers at once while the upload is in flight, and the upload succeeds."""
    from planner import validation
    from planner.model_profile import ModelProfile

    real = validation.reject_lax_scalars

    def slow(model, data):
        if model is ModelProfile:
            time.sleep(1.5)
        return real(model, data)

    monkeypatch.setattr(validation, "reject_lax_scalars", slow)
    body = tiny_profile().model_dump(mode="json")
    with (running_server(make_app(tmp_path / "plans.db")) as url, httpx.Client(base_url=url, timeout=30) as http,
          ThreadPoolExecutor(1) as pool):
        upload = pool.submit(http.post, "/v1/profiles", json=body)
        time.sleep(0.3)  # the upload is now being validated
        t0 = time.perf_counter()
        assert http.get("/healthz").status_code == 200
        waited = time.perf_counter() - t0
        assert not upload.done()  # the probe really overlapped the validation
        assert upload.result().status_code == 201
    assert waited < 0.5, f"/healthz waited {waited:.2f} s behind a body being validated"
