"""Load test of the planning service on loopback: requests/s and latency for uncached and cached plan requests.

    .venv/bin/python bench/service_load.py                      # gpt2-small on dgx-a100-80gb, 2 nodes
    .venv/bin/python bench/service_load.py --model gpt-tiny --cluster cpu --uncached 24 --cached 1000

Starts `uvicorn api.app:app_from_env` in a subprocess on a free 127.0.0.1 port with a fresh database, sends
`--uncached` distinct plan requests (each a new search: the global batch size differs), then `--cached` repeats of
them (answered from the store), `--concurrency` at a time, while a side thread polls /healthz to show the event
loop stays responsive during searches. Prints one table and stops the server.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _body(args: argparse.Namespace, batch: int) -> dict:
    return {
        "model": {"kind": "zoo", "name": args.model},
        "cluster": {"kind": "preset", "name": args.cluster, **({"nodes": args.nodes} if args.nodes else {})},
        "global_batch_size": batch,
        "options": {"time_limit_s": args.time_limit},
    }


def _run_phase(client: httpx.Client, bodies: list[dict], concurrency: int, expect_cached: bool) -> dict:
    latencies: list[float] = []
    failures = 0
    cached = 0

    def one(body: dict) -> None:
        nonlocal failures, cached
        started = time.perf_counter()
        response = client.post("/v1/plans", json=body)
        latencies.append(time.perf_counter() - started)
        if response.status_code not in (200, 201):
            failures += 1
        elif response.json()["cached"]:
            cached += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    return {
        "requests": len(bodies), "failures": failures, "cached": cached, "wall_s": wall,
        "rps": len(bodies) / wall, "p50_ms": 1e3 * _percentile(latencies, 0.50),
        "p99_ms": 1e3 * _percentile(latencies, 0.99), "expect_cached": expect_cached,
    }


def main() -> None:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small", help="Zoo model name.")
    parser.add_argument("--cluster", default="dgx-a100-80gb", help="Cluster preset.")
    parser.add_argument("--nodes", type=int, default=2, help="Nodes of the preset.")
    parser.add_argument("--uncached", type=int, default=16, help="Distinct plan requests (each searches).")
    parser.add_argument("--cached", type=int, default=500, help="Repeated plan requests (answered from the store).")
    parser.add_argument("--concurrency", type=int, default=8, help="Requests in flight at once.")
    parser.add_argument("--time-limit", type=float, default=2.0, help="Solver time limit per search, seconds.")
    parser.add_argument("--search-workers", type=int, default=2, help="Server search threads.")
    args = parser.parse_args()

    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="autopar-bench-"))
    env = dict(os.environ, AUTOPAR_DB_PATH=str(workdir / "plans.db"), AUTOPAR_PROFILE_CACHE_DIR=str(workdir / "cache"),
               AUTOPAR_SEARCH_WORKERS=str(args.search_workers), AUTOPAR_MAX_SOLVER_SECONDS=str(args.time_limit))
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:app_from_env", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"],
        env=env, cwd=Path(__file__).resolve().parents[1],
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.1)

        bodies = [_body(args, 8 * (i + 1)) for i in range(args.uncached)]
        health: list[float] = []
        stop = threading.Event()

        def poll_health() -> None:
            with httpx.Client(base_url=base, timeout=30) as probe:
                while not stop.is_set():
                    started = time.perf_counter()
                    probe.get("/healthz")
                    health.append(time.perf_counter() - started)
                    stop.wait(0.05)

        limits = httpx.Limits(max_connections=args.concurrency + 4)
        with httpx.Client(base_url=base, timeout=600, limits=limits) as client:
            # Warm-up outside the measurement: imports torch and profiles the model once (cached afterwards).
            client.post("/v1/plans", json=_body(args, 8 * (args.uncached + 1)))
            poller = threading.Thread(target=poll_health, daemon=True)
            poller.start()
            uncached = _run_phase(client, bodies, args.concurrency, expect_cached=False)
            stop.set()
            poller.join(30)
            repeats = [bodies[i % len(bodies)] for i in range(args.cached)]
            cached = _run_phase(client, repeats, args.concurrency, expect_cached=True)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=20)

    print(f"autopar service load: {args.model} on {args.cluster} x{args.nodes} nodes, solver limit "
          f"{args.time_limit:g} s, {args.search_workers} search workers, concurrency {args.concurrency}, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'phase':<10} {'requests':>8} {'failed':>6} {'cached':>6} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9}")
    for name, row in (("uncached", uncached), ("cached", cached)):
        print(f"{name:<10} {row['requests']:>8} {row['failures']:>6} {row['cached']:>6} {row['rps']:>9.1f} "
              f"{row['p50_ms']:>9.1f} {row['p99_ms']:>9.1f}")
    if health:
        print(f"/healthz during the uncached phase: {len(health)} probes, p50 {1e3 * statistics.median(health):.1f} ms, "
              f"p99 {1e3 * _percentile(health, 0.99):.1f} ms, max {1e3 * max(health):.1f} ms")


if __name__ == "__main__":
    main()
