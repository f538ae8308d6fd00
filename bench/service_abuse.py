"""Replays the hardening issue's attacks against a real `autopar serve` on loopback and prints, per attack, the
status codes, the server's peak memory (RSS) and time, and whether the service stayed healthy.

    .venv/bin/python bench/service_abuse.py

Bounded and loopback only: the server is a subprocess on a free 127.0.0.1 port with a fresh database (client
timeouts 2 s, stored-JSON cap 16 MiB, 4 searches per client); every attack sends a fixed, small amount of work.
"Healthy" means `/healthz` answered within 2 s both during the attack and after it, and an ordinary plan request
from another client was answered (not 5xx) afterwards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.gpt_formula import gpt_profile
from planner.model_profile import INPUT_NODE, OUTPUT_NODE, LayerEdge

CLIENT_TIMEOUT_S = 2.0
MiB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m api.cli serve` in a subprocess, with a sampler of its resident memory."""

    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.db = workdir / "plans.db"
        env = dict(os.environ, AUTOPAR_HEADER_TIMEOUT_S=str(CLIENT_TIMEOUT_S),
                   AUTOPAR_BODY_TIMEOUT_S=str(CLIENT_TIMEOUT_S), AUTOPAR_KEEP_ALIVE_S=str(CLIENT_TIMEOUT_S),
                   AUTOPAR_MAX_STORED_BYTES=str(16 * MiB), AUTOPAR_MAX_SEARCHES_PER_CLIENT="4",
                   AUTOPAR_MAX_SOLVER_SECONDS="10", AUTOPAR_PROFILE_CACHE_DIR=str(workdir / "cache"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--port", str(self.port), "--db", str(self.db),
             "--log-level", "warning"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not start")

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def measure(server: Server, attack: Callable[[], Counter]) -> dict:
    """Run `attack` while sampling RSS and /healthz; then check health and an ordinary request."""
    peak, probes, stop = [server.rss()], [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(server.rss())
            probes.append(server.healthy())
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    sampler.start()
    try:
        codes = attack()
    finally:
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - started
    ordinary = _plan(server, _tiny_body(batch=int(time.time() * 1000) % 997 * 4 + 4), client="bystander")
    healthy = all(probes) and server.healthy() and ordinary[0] in "24"
    late = sum(1 for ok in probes if not ok)
    return {"codes": codes, "peak_mib": max(peak) / MiB, "seconds": seconds, "healthy": healthy,
            "late": f"{late} of {len(probes)}", "ordinary": ordinary}


def _plan(server: Server, body: dict, client: str = "attacker", timeout: float = 60) -> str:
    """The answer's status, with the error code for a refusal ("gave up" when the client timed out and left)."""
    try:
        r = httpx.post(f"{server.base}/v1/plans", json=body, headers={"X-API-Key": client}, timeout=timeout)
    except httpx.TimeoutException:
        return "gave up"
    return str(r.status_code) if r.status_code < 400 else f"{r.status_code} {r.json()['error']['code']}"


def _tiny_body(batch: int = 8, time_limit_s: float = 1.0) -> dict:
    return {"model": {"kind": "zoo", "name": "gpt-tiny", "dtype": "float32"}, "cluster": {"kind": "preset", "name": "cpu"},
            "global_batch_size": batch, "options": {"time_limit_s": time_limit_s}}


def _wide_profile() -> dict:
    """512 layers, 65k long-range edges (each layer of the first half feeds each of the second): ~5 MiB of JSON whose
    layer graph takes seconds of CPU to prepare, like the issue's 5.5 MiB profile."""
    base = gpt_profile(num_layers=510, hidden=256, heads=4, seq_len=128, vocab_size=1000, dtype="float32")
    names = [x.name for x in base.layers]
    half = len(names) // 2
    edges = [LayerEdge(src=a, dst=b, bytes=1.0) for a, b in zip([INPUT_NODE, *names], [*names, OUTPUT_NODE])]
    edges += [LayerEdge(src=names[a], dst=names[half + b], bytes=1.0) for a in range(half) for b in range(half)]
    return json.loads(base.model_copy(update={"edges": edges}).model_dump_json())


def _raw(server: Server, payload: bytes, count: int = 1, read: bool = True) -> Counter:
    """Open `count` connections, send `payload` on each, and read what comes back until the server closes."""
    codes: Counter = Counter()
    conns = [socket.create_connection(("127.0.0.1", server.port), timeout=15) for _ in range(count)]
    for c in conns:
        c.sendall(payload)
    for c in conns:
        answer = b""
        try:
            while read and (chunk := c.recv(65536)):
                answer += chunk
            codes[answer[9:12].decode() if answer.startswith(b"HTTP/") else "closed"] += 1
        except TimeoutError:
            codes["held open"] += 1
        finally:
            c.close()
    return codes


def attacks(server: Server) -> dict[str, Callable[[], Counter]]:
    big = b'{"a": "' + b"x" * (64 * MiB) + b'"}'
    wide = _wide_profile()

    def chunked_lie() -> Counter:
        head = b"POST /v1/plans HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n" \
               b"Transfer-Encoding: chunked\r\n\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=15) as c:
            c.sendall(head)
            try:
                for i in range(0, len(big), MiB):
                    piece = big[i:i + MiB]
                    c.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                c.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the server answered and closed before the whole body was sent
            answer = c.recv(4096)
        return Counter([answer[9:12].decode() if answer else "closed"])

    def declared_huge() -> Counter:
        return _raw(server, b"POST /v1/profiles HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n{")

    def non_finite() -> Counter:
        profile = gpt_profile(num_layers=4, hidden=64, heads=4, seq_len=32, vocab_size=100).model_dump(mode="json")
        bad = []
        for value in ("Infinity", "NaN", "1e308"):
            text = json.dumps(profile).replace('"fwd_flops": ' + json.dumps(profile["layers"][1]["fwd_flops"]),
                                               f'"fwd_flops": {value}', 1)
            bad.append(httpx.post(f"{server.base}/v1/profiles", content=text, timeout=30,
                                  headers={"content-type": "application/json"}).status_code)
        return Counter(bad)

    def slow_headers() -> Counter:
        return _raw(server, b"POST /v1/plans HTTP/1.1\r\nHost: x\r\nContent-Le", count=300)

    def slow_bodies() -> Counter:
        return _raw(server, b"POST /v1/plans HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"m", count=100)

    def expensive_tiny_limit() -> Counter:
        body = {"model": {"kind": "profile", "profile": wide}, "cluster": {"kind": "preset", "name": "cpu"},
                "global_batch_size": 8, "options": {"time_limit_s": 0.001}}
        with ThreadPoolExecutor(4) as pool:
            return Counter(pool.map(lambda i: _plan(server, dict(body, global_batch_size=8 * (i + 1)),
                                                    client=f"c{i}"), range(4)))

    def abandoned() -> Counter:
        body = {"model": {"kind": "profile", "profile": wide}, "cluster": {"kind": "preset", "name": "cpu"},
                "global_batch_size": 8, "options": {"time_limit_s": 10}}
        with ThreadPoolExecutor(4) as pool:
            codes = Counter(pool.map(lambda i: _plan(server, dict(body, global_batch_size=8 * (i + 5)),
                                                     client=f"d{i}", timeout=1.0), range(4)))
        started = time.perf_counter()
        after = _plan(server, _tiny_body(batch=12), client="next")
        codes[f"next plan {after} in {time.perf_counter() - started:.1f} s"] += 1
        return codes

    def one_client_flood() -> Counter:
        with ThreadPoolExecutor(16) as pool:
            return Counter(pool.map(lambda b: _plan(server, _tiny_body(batch=4 * b, time_limit_s=2)), range(20, 36)))

    def evaluate_flood() -> Counter:
        body = {"model": {"kind": "profile", "profile": wide}, "cluster": {"kind": "preset", "name": "cpu"},
                "strategy": {"dims": {"dp": 4, "tp": 1, "pp": 1, "world_size": 4}, "micro_batch_size": 2,
                             "num_micro_batches": 1, "stages": [{"start": 0, "stop": 512}]}}

        def one(i: int) -> str:
            r = httpx.post(f"{server.base}/v1/evaluate", json=body, headers={"X-API-Key": f"e{i}"}, timeout=60)
            if r.status_code != 200:
                return f"{r.status_code} {r.json()['error']['code']}"
            return "200 cached" if r.json()["cached"] else "200"

        with ThreadPoolExecutor(8) as pool:
            return Counter(pool.map(one, range(8)))

    def storage_growth() -> Counter:
        codes: Counter = Counter()
        for i in range(20):
            profile = gpt_profile(num_layers=400, hidden=64 + 4 * i, heads=4, seq_len=32, vocab_size=100)
            codes[httpx.post(f"{server.base}/v1/profiles", content=profile.model_dump_json(), timeout=30,
                             headers={"content-type": "application/json"}).status_code] += 1
        codes[f"db {server.db.stat().st_size / MiB:.0f} MiB"] += 1
        return codes

    return {"64 MiB chunked body, Content-Length: 5": chunked_lie,
            "Content-Length: 100 MiB": declared_huge,
            "Infinity / NaN / 1e308 in a profile": non_finite,
            "300 connections, half a request head": slow_headers,
            "100 connections, half a body": slow_bodies,
            "4 x 5 MiB wide profile, time_limit_s 0.001": expensive_tiny_limit,
            "4 x wide profile, client leaves after 1 s": abandoned,
            "16 distinct plans at once, one client": one_client_flood,
            "8 equal evaluations of the wide profile": evaluate_flood,
            "20 distinct ~0.5 MiB profile uploads": storage_growth}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(Path(tmp))
        try:
            warm = _plan(server, _tiny_body(batch=4), client="warm-up")  # imports torch, profiles gpt-tiny once
            print(f"server idle RSS {server.rss() / MiB:.0f} MiB (after a warm-up plan: {warm})")
            print("| attack | status codes | peak RSS MiB | seconds | /healthz over 2 s during it | plan after it | "
                  "healthy |")
            print("|---|---|---|---|---|---|---|")
            for name, attack in attacks(server).items():
                result = measure(server, attack)
                codes = ", ".join(f"{k} x{v}" if v > 1 else str(k) for k, v in sorted(result["codes"].items(),
                                                                                        key=lambda kv: str(kv[0])))
                print(f"| {name} | {codes} | {result['peak_mib']:.0f} | {result['seconds']:.1f} | {result['late']} | "
                      f"{result['ordinary']} | {'yes' if result['healthy'] else 'NO'} |", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
