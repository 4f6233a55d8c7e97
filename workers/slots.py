"""How many rq jobs (prompt groups) a worker holds at once (docs/design.md §15.50 Many
groups in flight per worker). The worker takes another job only while there is room:
fewer jobs in flight than ``capacity()``, which may change as it runs (an adaptive
concurrency window). At least one job is always allowed, so a group larger than the window
still runs."""
from __future__ import annotations

import math
import threading
from typing import Any, Callable


class JobSlots:
    """Jobs held (taken, not yet recorded by rq) and, among them, jobs drawing. Room counts
    the drawing ones: a job whose draws are done frees its room while rq records it."""

    def __init__(self, capacity: Callable[[], int]):
        self.capacity = capacity
        self.held: set[str] = set()
        self.drawing: set[str] = set()
        self.peak = 0  # most jobs ever drawing at once (tests)
        self._changed = threading.Condition()

    @property
    def running(self) -> int:
        return len(self.held)

    @property
    def busy(self) -> bool:
        return bool(self.held)

    def has_room(self) -> bool:
        return len(self.drawing) < max(1, self.capacity())

    def wait_for_room(self, timeout: float) -> bool:
        """True once another job fits; False after ``timeout`` s (the caller beats and asks
        again: a window that grew is noticed then)."""
        with self._changed:
            return self._changed.wait_for(self.has_room, timeout)

    def take(self, job_id: str) -> None:
        with self._changed:
            self.held.add(job_id)
            self.drawing.add(job_id)
            self.peak = max(self.peak, len(self.drawing))

    def drawn(self, job_id: str) -> None:
        with self._changed:
            self.drawing.discard(job_id)
            self._changed.notify_all()

    def release(self, job_id: str) -> None:
        with self._changed:
            self.held.discard(job_id)
            self.drawing.discard(job_id)
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: not self.held, timeout)


def job_capacity(window: Callable[[], int], group_size: int) -> Callable[[], int]:
    """Jobs to hold for a request window: enough groups to fill it (the last one may
    overlap it: its extra draws wait for a slot of the window, they are never lost)."""
    return lambda: max(1, math.ceil(window() / max(1, group_size)))


def most_rows(cfg: Any) -> int:
    """The most draws a worker keeps in flight: a remote backend's request window
    (``inference.max_concurrency``; an adaptive window stays under it), or the local
    backend's ``workers.local_max_batch`` (unset: one group)."""
    if cfg.inference.remote:
        return cfg.inference.max_concurrency
    return cfg.workers.local_max_batch or cfg.completions_per_prompt


def holds_several(cfg: Any) -> bool:
    return math.ceil(most_rows(cfg) / cfg.completions_per_prompt) > 1


def worker_slots(cfg: Any, controller: Any) -> JobSlots | None:
    """The worker's job slots, or None when it runs one group at a time: a remote backend
    fills its concurrency controller's current window; the local backend holds
    ``workers.local_max_batch`` rows' worth of groups."""
    if not holds_several(cfg):
        return None
    if cfg.inference.remote:
        return JobSlots(job_capacity(lambda: controller.window, cfg.completions_per_prompt))
    rows = most_rows(cfg)
    return JobSlots(job_capacity(lambda: rows, cfg.completions_per_prompt))
