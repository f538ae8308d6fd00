"""The one base class for mistakes a user can fix; the CLI prints these without a traceback."""


class AutoparError(ValueError):
    """A user-facing error: the message names the problem and the fix."""
