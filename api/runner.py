"""Runs searches off the event loop: a wall-clock guard, bounded queue, per-client limits, single flight, cancellation.

CP-SAT and the cost model are blocking CPU work, so they run on a small thread pool; the event loop stays free to
answer `/healthz` while a search runs. Identical requests that arrive while the first is still searching wait for
that search instead of starting their own (single flight), so a burst of equal requests costs one search.

Each job carries a cancellation flag (a `threading.Event` handed to the job function as `cancel=`; the planner checks
it between steps). When every caller waiting on a job has gone (its client disconnected, or it got its 504), the
flag is set and the job stops within a fraction of a second, so abandoned work does not hold a worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from api.errors import ApiError

T = TypeVar("T")
log = logging.getLogger(__name__)

#: How often a waiting request looks whether its client is still connected.
DISCONNECT_POLL_S = 0.25


@dataclass
class _Job:
    future: concurrent.futures.Future[Any]
    client: str | None
    cancel: threading.Event = field(default_factory=threading.Event)
    waiters: int = 0


class ResultCache:
    """A bounded, thread-safe map from a request's content key to its answer; the least recently used entry goes
    first. For answers that are pure functions of the request (what-if evaluations), so nothing needs storing."""

    def __init__(self, max_entries: int) -> None:
        """Keep at most `max_entries` answers."""
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any | None:
        """The answer stored under `key` (now the most recently used), or None."""
        with self._lock:
            if key not in self._entries:
                return None
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: str, value: Any) -> None:
        """Store an answer, evicting the least recently used ones past the bound."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        """Answers held now."""
        return len(self._entries)


class SearchRunner:
    """A thread pool for blocking planner work, shared by all requests of one app."""

    def __init__(self, *, workers: int, max_pending: int, timeout_s: float, max_per_client: int | None = None) -> None:
        """`workers` threads; at most `max_pending` jobs queued or running, at most `max_per_client` of them started
        by one client (None: no per-client limit); callers wait at most `timeout_s`."""
        self._workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._max_pending = max_pending
        self._max_per_client = max_per_client
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._inflight: dict[str, _Job] = {}
        self._per_client: dict[str, int] = {}
        self._pending = 0
        self.cancelled = 0  #: jobs whose callers all gave up (their cancellation flag was set)

    @property
    def pending(self) -> int:
        """Jobs queued or running now."""
        return self._pending

    def _finished(self, key: str | None, job: _Job) -> None:
        with self._lock:
            self._pending -= 1
            if job.client is not None:
                left = self._per_client.get(job.client, 1) - 1
                if left > 0:
                    self._per_client[job.client] = left
                else:
                    self._per_client.pop(job.client, None)
            if key is not None and self._inflight.get(key) is job:
                del self._inflight[key]

    def submit(self, key: str | None, fn: Callable[..., T], *args: Any, client: str | None = None
               ) -> tuple[_Job, bool]:
        """Start `fn(*args, cancel=flag)` unless a job with the same `key` is running; (the job, whether it is new).

        The caller is counted as one of the job's waiters; `run` releases it.
        """
        with self._lock:
            job = self._inflight.get(key) if key is not None else None
            if job is not None and not job.cancel.is_set():
                job.waiters += 1
                return job, False
            if self._pending >= self._max_pending:
                raise ApiError(
                    503, "busy", f"{self._pending} searches are already queued or running; retry in a few seconds",
                    headers={"Retry-After": "5"},
                )
            if client is not None and self._max_per_client is not None \
                    and self._per_client.get(client, 0) >= self._max_per_client:
                raise ApiError(
                    429, "too_many_requests", f"this client already has {self._max_per_client} searches queued or "
                    "running (the server's per-client limit); wait for one to finish, then retry",
                    headers={"Retry-After": "5"},
                )
            if self._pool is None:  # created on first use, and again after a shutdown (an app restarted in-process)
                self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="autopar-search")
            cancel = threading.Event()
            future = self._pool.submit(fn, *args, cancel=cancel)
            job = _Job(future=future, client=client, cancel=cancel, waiters=1)
            self._pending += 1
            if client is not None:
                self._per_client[client] = self._per_client.get(client, 0) + 1
            if key is not None:
                self._inflight[key] = job
        future.add_done_callback(lambda _: self._finished(key, job))
        return job, True

    def _release(self, job: _Job) -> None:
        """One waiter is done with `job`; when none is left and it still runs, set its cancellation flag."""
        with self._lock:
            job.waiters -= 1
            abandon = job.waiters <= 0 and not job.future.done()
            if abandon:
                job.cancel.set()
                self.cancelled += 1
        if abandon:
            log.info("every caller of a running search gave up; cancelling it")

    async def run(self, key: str | None, fn: Callable[..., T], *args: Any, client: str | None = None,
                  disconnected: Callable[[], Awaitable[bool]] | None = None) -> tuple[T, bool]:
        """Await `fn(*args, cancel=flag)` on the pool (joining an in-flight job with the same key); (result,
        started_here). `disconnected` is polled while waiting: once it says the client is gone, this caller stops
        waiting (and the job is cancelled if no other caller waits for it)."""
        job, started = self.submit(key, fn, *args, client=client)
        loop = asyncio.get_running_loop()
        waiting = asyncio.wrap_future(job.future)
        end = loop.time() + self.timeout_s
        try:
            while True:
                remaining = end - loop.time()
                if remaining <= 0:
                    raise ApiError(
                        504, "search_timeout",
                        f"the search did not finish within the server's {self.timeout_s:g} s guard; ask for a "
                        "smaller options.time_limit_s or a smaller model / cluster",
                    )
                # asyncio.wait never cancels what it waits on: a caller that leaves does not cancel the job here.
                done, _ = await asyncio.wait({waiting}, timeout=min(DISCONNECT_POLL_S, remaining))
                if done:
                    return waiting.result(), started
                if disconnected is not None and await disconnected():
                    raise ApiError(499, "client_closed_request", "the client closed the connection; the request's "
                                   "work was stopped")
        finally:
            if not waiting.done():  # its outcome (often PlanCancelled) is nobody's now: do not log it as unread
                waiting.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._release(job)

    def shutdown(self) -> None:
        """Drop queued jobs and cancel running ones (their callers are gone with the app)."""
        with self._lock:
            pool, self._pool = self._pool, None
            for job in self._inflight.values():
                job.cancel.set()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
