"""Which weights a group's draws were actually served with, gathered while they run.

A server can serve another version than the worker believes: an engine that restarted came
back with other weights, older or newer (a restart loads the newest published version; a worker
that wanted an older one adopts it), and a server reloaded by another worker while a request was
in flight may have answered it with either version (rlstream.sampling.remote reads the version a
server serves after each answer). Each completion's stamp, and the newest version that may have
served it, go into the ``VersionSpan`` of the group it belongs to, found through a context
variable the worker sets in the group's coroutine (every draw task inherits it), so the group's
samples carry the oldest and the newest version any of them may have used (docs/design.md §15.71
Engines sync through their own routes).
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

    def add_span(self, other: "VersionSpan") -> None:
        """Every stamp ``other`` holds (a merged request's, shared by the draws it answered)."""
        for version in (other.low, other.high):
            if version is not None:
                self.add(version)

    def bounds(self, start: int, end: int) -> tuple[int, int]:
        """A group's (min_version, max_version): the oldest version a server reported for one of
        its completions (``start``, the policy's version when the group began, when none did: the
        local backend and servers that report none), and the newest of those and ``end`` (the
        policy's version when it ended: another job may have loaded newer weights meanwhile)."""
        low = start if self.low is None else self.low
        return low, max(end, low) if self.high is None else max(end, self.high)


drawn_versions: ContextVar[VersionSpan | None] = ContextVar("drawn_versions", default=None)


def record(version: int, newest: int | None = None) -> None:
    """Add one completion's stamp to the span of the group being drawn, if any; ``newest``: the
    newest version that may have served it, when the server changed versions while answering."""
    span = drawn_versions.get()
    if span is not None:
        span.add(version)
        if newest is not None:
            span.add(newest)
