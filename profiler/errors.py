"""Errors the profiler raises for mistakes a user can fix."""

from planner.errors import AutoparError


class ProfileError(AutoparError):
    """The model or its example inputs cannot be profiled; the message names the problem and the fix."""
