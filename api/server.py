"""uvicorn, configured so slow or idle clients cannot hold connections open.

    config = server_config(create_app(settings), settings, host="127.0.0.1", port=8000)
    run_server(config)                       # or run_server(config, workers=4) with an app factory string

uvicorn already closes an idle keep-alive connection (`timeout_keep_alive`) and refuses connections past
`limit_concurrency`, but it never times a request head: a client that connects and sends half a request line holds
its connection forever. `GuardedH11Protocol` closes a connection whose request head has not arrived within
`Settings.header_timeout_s` of the connection opening (or of its first byte after a finished response). The body
read is timed by `api.middleware.BodyLimitMiddleware` (408 after `Settings.body_timeout_s`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from api.settings import Settings

log = logging.getLogger(__name__)

#: Used when a uvicorn Config was built without `server_config` (no `header_timeout_s` on it).
DEFAULT_HEADER_TIMEOUT_S = 10.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a deadline on each request head (`config.header_timeout_s`)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        """As H11Protocol; reads the head deadline from `config` so it survives uvicorn's worker processes."""
        super().__init__(config, *args, **kwargs)
        self.header_timeout_s = float(getattr(config, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S))
        self._head_timer: asyncio.TimerHandle | None = None

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request head within %g s", self.client,
                     self.header_timeout_s)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the head deadline as soon as the client connects."""
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        """Bytes of a new request (none in progress) start the deadline; a parsed request head stops it."""
        if self.cycle is None or self.cycle.response_complete:
            self._arm_head_timer()
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:
            self._disarm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadline with the connection."""
        self._disarm_head_timer()
        super().connection_lost(exc)


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """A uvicorn Config carrying the settings' connection limits: head deadline, keep-alive, open connections.
    `options` are passed to uvicorn.Config (host, port, log_level, workers, factory, ...)."""
    config = uvicorn.Config(app, http=GuardedH11Protocol, timeout_keep_alive=settings.keep_alive_s,
                            limit_concurrency=settings.max_connections, **options)
    # Not a uvicorn option: carried on the config (pickled into worker processes) for GuardedH11Protocol.
    config.header_timeout_s = settings.header_timeout_s  # type: ignore[attr-defined]
    return config


def run_server(config: uvicorn.Config) -> None:
    """Serve until interrupted: in this process, or in `config.workers` worker processes (app given as a string)."""
    from uvicorn.supervisors import Multiprocess

    if config.workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        uvicorn.Server(config).run()
