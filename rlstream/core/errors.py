"""Errors that carry what the user must do next. The CLI prints them as one line."""
from __future__ import annotations


class RlstreamError(Exception):
    """Base class; ``str(err)`` is a complete, actionable one-line message."""

    exit_code = 1


class ConfigError(RlstreamError):
    """Bad configuration: exit code 2, nothing was started."""

    exit_code = 2


class RedisUnavailable(RlstreamError):
    """Redis could not be reached within the bounded retry budget."""


class RunFailed(RlstreamError):
    """A child process of ``rlstream up`` failed."""
