"""The body limit counts bytes as they arrive, whatever the headers claim, and the API key is checked before any body
is read (issue: a chunked body beside `Content-Length: 5` was read whole, also without a key)."""

from __future__ import annotations

import socket

from service_support import make_app
from test_service_server import running_server

LIMIT = 64 * 1024


def _raw(url: str, head: str, chunks: list[bytes]) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head.encode())
        for chunk in chunks:
            try:
                s.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except OSError:  # the server refused and closed while we were still sending
                break
        else:
            try:
                s.sendall(b"0\r\n\r\n")
            except OSError:
                pass
        data = b""
        try:
            while part := s.recv(65536):  # the server closes the connection after an error
                data += part
        except ConnectionResetError:  # closed with our unread chunks still queued: what arrived is complete
            pass
        status = int(data.split(b" ", 2)[1]) if data else 0
        return status, data


def _head(extra: str = "") -> str:
    return ("POST /v1/plans HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n{extra}\r\n")


def test_chunked_body_beside_a_small_content_length_is_cut_off_at_the_limit(tmp_path):
    body = [b"[" + b"1," * (LIMIT // 4)] * 8  # 8 x 32 KiB: 256 KiB against a 64 KiB limit
    with running_server(make_app(tmp_path / "p.db", max_body_bytes=LIMIT)) as url:
        status, data = _raw(url, _head(), body)
    assert status == 413, data[:300]
    assert b"body_too_large" in data


def test_without_a_key_the_request_is_refused_before_its_body_is_read(tmp_path):
    # Headers and the first chunk of a body that never ends: the 401 must come back while the body is still open.
    with running_server(make_app(tmp_path / "p.db", api_keys=("secret",))) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(_head().encode() + b"400\r\n" + b"{" * 1024 + b"\r\n")
            data = s.recv(65536)  # times out (fails) if the server waits for the rest of the body
            while part := s.recv(65536):  # the server closes the connection after the error
                data += part
    assert data.startswith(b"HTTP/1.1 401"), data[:300]
    assert b"unauthorized" in data


def test_a_valid_key_and_a_small_body_still_reach_the_app(tmp_path):
    with running_server(make_app(tmp_path / "p.db", api_keys=("secret",), max_body_bytes=LIMIT)) as url:
        status, data = _raw(url, _head("X-API-Key: secret\r\n"), [b"{}"])
    assert status == 422, data[:300]  # the app parsed the (empty) request and said which fields are missing
