"""Runs searches off the event loop, with a wall-clock guard, a bound on queued work and single flight.

CP-SAT and the cost model are blocking CPU work, so they run on a small thread pool; the event loop stays free to
answer `/healthz` while a search runs. Identical requests that arrive while the first is still searching wait for
that search instead of starting their own (single flight), so a burst of equal requests costs one search.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from api.errors import ApiError

T = TypeVar("T")


class SearchRunner:
    """A thread pool for blocking planner work, shared by all requests of one app."""

    def __init__(self, *, workers: int, max_pending: int, timeout_s: float) -> None:
        """`workers` threads; at most `max_pending` jobs queued or running; callers wait at most `timeout_s`."""
        self._workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._max_pending = max_pending
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._inflight: dict[str, concurrent.futures.Future[Any]] = {}
        self._pending = 0

    @property
    def pending(self) -> int:
        """Jobs queued or running now."""
        return self._pending

    def _finished(self, key: str | None, _: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending -= 1
            if key is not None:
                self._inflight.pop(key, None)

    def submit(self, key: str | None, fn: Callable[..., T], *args: Any) -> tuple[concurrent.futures.Future[T], bool]:
        """Start `fn(*args)` unless a job with the same `key` is running; return its future and whether it is new."""
        with self._lock:
            if key is not None and key in self._inflight:
                return self._inflight[key], False
            if self._pending >= self._max_pending:
                raise ApiError(
                    503, "busy", f"{self._pending} searches are already queued or running; retry in a few seconds"
                )
            if self._pool is None:  # created on first use, and again after a shutdown (an app restarted in-process)
                self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="autopar-search")
            future = self._pool.submit(fn, *args)
            self._pending += 1
            if key is not None:
                self._inflight[key] = future
        future.add_done_callback(lambda f: self._finished(key, f))
        return future, True

    async def run(self, key: str | None, fn: Callable[..., T], *args: Any) -> tuple[T, bool]:
        """Await `fn(*args)` on the pool (joining an in-flight job with the same key); (result, started_here)."""
        future, started = self.submit(key, fn, *args)
        try:
            # shield: a caller that gives up must not cancel a job other callers are waiting for.
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(
                504, "search_timeout",
                f"the search did not finish within the server's {self.timeout_s:g} s guard; ask for a smaller "
                "options.time_limit_s or a smaller model / cluster",
            ) from None
        return result, started

    def shutdown(self) -> None:
        """Drop queued jobs; running ones finish in the background (their solver time is capped)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
