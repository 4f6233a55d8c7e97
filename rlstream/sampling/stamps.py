"""Which weights a group's draws were actually served with, gathered while they run.

A server can serve an older version than the worker believes: an engine that restarted came
back with other weights (rlstream.sampling.remote reads the version a server serves after each
answer). Each completion's stamp is added to the ``VersionSpan`` of the group it belongs to,
found through a context variable the worker sets in the group's coroutine (every draw task
inherits it), so the group's samples are stamped with the oldest version any of them used
(docs/design.md §15.71 Engines sync through their own routes).
"""
from __future__ import annotations

import threading
from contextvars import ContextVar


class VersionSpan:
    """The lowest and highest stamp of a group's completions (None before any)."""

    def __init__(self) -> None:
        self.low: int | None = None
        self.high: int | None = None
        self._lock = threading.Lock()

    def add(self, version: int) -> None:
        with self._lock:
            self.low = version if self.low is None else min(self.low, version)
            self.high = version if self.high is None else max(self.high, version)

    def floor(self, version: int) -> int:
        """``version``, or lower when a completion was served with older weights."""
        return version if self.low is None else min(version, self.low)


drawn_versions: ContextVar[VersionSpan | None] = ContextVar("drawn_versions", default=None)


def record(version: int) -> None:
    """Add one completion's stamp to the span of the group being drawn, if any."""
    span = drawn_versions.get()
    if span is not None:
        span.add(version)
