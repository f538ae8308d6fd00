"""One deadline and one cancellation flag for a whole `planner.plan` call: graph preparation and search share them.

`Budget(time_limit_s)` starts its clock when it is made. The deadline is firm once the search holds a strategy:
it then stops and reports the gap it proved. Until then (graph preparation, and the first pass of the search
before any strategy fits) the work may overrun to a hard deadline `grace_s` later (default: one more time limit,
at least 2 s), past which it stops with `PlanTimeout` rather than answer nothing after unbounded work. `prepare`
and `search` look at the budget inside their loops, so they stop within a fraction of a second of the deadline, or
as soon as the caller sets `cancel` (the service does when the client disconnects or gets its 504).
Pure: no I/O, no torch.
"""

from __future__ import annotations

import threading
import time

from planner.errors import AutoparError

#: The least budget a search gets, as `planner.search` always granted: enough for one greedy pass on small inputs.
MIN_BUDGET_S = 0.5
#: The least grace before the hard deadline, for work that has no strategy to answer yet.
MIN_GRACE_S = 2.0


class PlanTimeout(AutoparError):
    """The time limit ran out before the planner had any strategy to answer."""


class PlanCancelled(AutoparError):
    """The caller abandoned the plan (its cancellation flag was set); the work was stopped."""


class Budget:
    """A deadline `max(MIN_BUDGET_S, time_limit_s)` seconds from now, a hard deadline `grace_s` after it, and an
    optional cancellation flag."""

    def __init__(self, time_limit_s: float, cancel: threading.Event | None = None, grace_s: float | None = None
                 ) -> None:
        """Start the clock; `cancel`, when given, is a flag another thread sets to stop the work; `grace_s` (default
        max(time limit, MIN_GRACE_S)) is how far work without any strategy yet may run past the deadline."""
        self.time_limit_s = max(MIN_BUDGET_S, time_limit_s)
        self.started = time.perf_counter()
        self.expires_at = self.started + self.time_limit_s
        self.grace_s = max(self.time_limit_s, MIN_GRACE_S) if grace_s is None else grace_s
        self.hard_expires_at = self.expires_at + self.grace_s
        self.cancel = cancel

    def remaining(self) -> float:
        """Seconds left before the deadline (negative once past it)."""
        return self.expires_at - time.perf_counter()

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.remaining() <= 0

    def cancelled(self) -> bool:
        """Whether the caller has set the cancellation flag."""
        return self.cancel is not None and self.cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise `PlanCancelled` if the caller gave up."""
        if self.cancelled():
            raise PlanCancelled("the plan request was abandoned by its caller; its work was stopped")

    def check(self, stage: str) -> None:
        """For work that has no strategy yet: raise `PlanCancelled` if the caller gave up, `PlanTimeout` if the hard
        deadline passed during `stage`."""
        self.check_cancelled()
        if time.perf_counter() > self.hard_expires_at:
            raise PlanTimeout(
                f"the time limit of {self.time_limit_s:g} s (plus {self.grace_s:g} s of grace) ran out while {stage}, "
                "before any strategy was found; give a larger time limit (time_limit_s / --time-limit) or a "
                "smaller model"
            )
