"""Slow clients are dropped: a real uvicorn on loopback closes connections with half a request head, a trickling
body or an idle keep-alive within the configured timeouts (`api.server`, `api.middleware`)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from service_support import make_app

from api.server import server_config
from api.settings import Settings

TIMEOUT_S = 0.5
#: How long a test waits for the server to close a connection before calling it held open.
PATIENCE_S = 5.0


@contextmanager
def guarded_server(tmp_path) -> Iterator[tuple[str, int]]:
    """`autopar serve`'s uvicorn configuration, with half-second client timeouts, on a free loopback port."""
    import uvicorn

    settings = Settings(db_path=tmp_path / "plans.db", header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S,
                        keep_alive_s=TIMEOUT_S)
    app = make_app(tmp_path / "plans.db", header_timeout_s=TIMEOUT_S, body_timeout_s=TIMEOUT_S,
                   keep_alive_s=TIMEOUT_S)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(server_config(app, settings, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def _until_closed(address: tuple[str, int], sent: bytes) -> tuple[bytes, float]:
    """Connect, send `sent`, read until the server closes; (what it answered, seconds until it closed)."""
    with socket.create_connection(address, timeout=PATIENCE_S) as conn:
        started = time.monotonic()
        if sent:
            conn.sendall(sent)
        answer = b""
        while chunk := conn.recv(65536):  # socket.timeout here means the server held the connection open
            answer += chunk
        return answer, time.monotonic() - started


def test_slow_clients_are_disconnected_within_the_timeouts(tmp_path):
    with guarded_server(tmp_path) as address:
        _, silent = _until_closed(address, b"")
        _, half_head = _until_closed(address, b"POST /v1/plans HTTP/1.1\r\nHost: x\r\nContent-Le")
        trickle, slow_body = _until_closed(
            address, b"POST /v1/plans HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        kept, idle = _until_closed(address, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        healthy = httpx.get(f"http://{address[0]}:{address[1]}/healthz", timeout=5).status_code
    for seconds in (silent, half_head, slow_body, idle):
        assert TIMEOUT_S * 0.8 <= seconds < TIMEOUT_S + 2.0
    assert trickle.startswith(b"HTTP/1.1 408") and b"body_timeout" in trickle
    assert kept.startswith(b"HTTP/1.1 200")  # answered, then closed once idle past the keep-alive limit
    assert healthy == 200


def test_many_half_open_connections_do_not_outlive_the_head_timeout(tmp_path):
    with guarded_server(tmp_path) as address:
        conns = [socket.create_connection(address, timeout=PATIENCE_S) for _ in range(50)]
        try:
            for c in conns:
                c.sendall(b"GET /healthz HTTP/1.1\r\nHo")
            started = time.monotonic()
            closed = sum(1 for c in conns if c.recv(1) == b"")
            elapsed = time.monotonic() - started
        finally:
            for c in conns:
                c.close()
    assert closed == 50 and elapsed < TIMEOUT_S + 2.0
