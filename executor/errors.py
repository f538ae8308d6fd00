"""Errors the executor raises for mistakes a user can fix (wrong launch, wrong plan, unsupported model layout)."""

from planner.errors import AutoparError


class ExecutorError(AutoparError):
    """A plan that cannot be run as launched, with what to change."""
