"""ASGI middleware in front of every route: the API key is checked, then the body is counted, before the app reads it.

- API key: when the server has keys, a request under /v1 without a valid one (`X-API-Key` or `Authorization: Bearer`)
  gets 401 before a byte of its body is read, so an unauthenticated client cannot make the server buffer anything.
- Body limit: a declared `Content-Length` over the limit is refused at once; whatever the headers say (a small
  `Content-Length` beside `Transfer-Encoding: chunked`, or none), the bytes are counted as they arrive and the request
  is refused with 413 as soon as they pass the limit. The body is buffered (at most the limit) and replayed to the app.
- Body timeout: a body that has not fully arrived `body_timeout_s` after the request head gets 408 and the
  connection is closed, so a client trickling bytes cannot hold a connection (the head is timed by `api.server`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


def _error(status: int, code: str, message: str, field: str, extra_headers: list | None = None) -> list[Message]:
    body = json.dumps({"error": {"code": code, "message": message, "field": field}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *(extra_headers or [])]
    return [{"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body}]


def key_is_valid(headers: dict[bytes, bytes], keys: tuple[str, ...]) -> bool:
    """Whether the request carries one of `keys` (compare_digest on every key: timing reveals nothing)."""
    given = headers.get(b"x-api-key")
    auth = headers.get(b"authorization", b"")
    if given is None and auth[:7].lower() == b"bearer ":
        given = auth[7:].strip()
    if not given:
        return False
    return any(hmac.compare_digest(given, k.encode()) for k in keys)


class BodyLimitMiddleware:
    """Answer 401 to unauthenticated /v1 requests and 413 to bodies over `max_bytes` (see the module docstring)."""

    def __init__(self, app: Any, max_bytes: int, api_keys: tuple[str, ...] | None = None,
                 body_timeout_s: float = 30.0) -> None:
        """Wrap the ASGI `app`."""
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout_s = body_timeout_s
        self.api_keys = tuple(api_keys or ())

    async def _send_all(self, send: Any, messages: list[Message]) -> None:
        for message in messages:
            await send(message)

    def _too_large(self) -> list[Message]:
        return _error(413, "body_too_large",
                      f"request body is larger than the server's limit of {self.max_bytes} bytes; send a smaller "
                      "profile (or upload it once with POST /v1/profiles and refer to it by id)", "body")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.api_keys and scope.get("path", "").startswith("/v1") and not key_is_valid(headers, self.api_keys):
            await self._send_all(send, _error(
                401, "unauthorized", "missing or wrong API key; send it as 'X-API-Key: <key>' or "
                "'Authorization: Bearer <key>'", "X-API-Key", [(b"www-authenticate", b"Bearer")]))
            return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = self.max_bytes + 1
            if declared > self.max_bytes:
                await self._send_all(send, self._too_large())
                return
        # Count what actually arrives: a declared length is only a claim.
        chunks: list[bytes] = []
        size = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await self._send_all(send, _error(
                    408, "body_timeout", f"the request body did not arrive within {self.body_timeout_s:g} s; send "
                    "it at once (and check Content-Length matches the body)", "body"))
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._send_all(send, self._too_large())
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
