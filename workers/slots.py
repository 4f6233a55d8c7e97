"""How much work a worker holds at once (docs/design.md §15.50 Many groups in flight per worker,
§15.73 A request-level window). The worker counts its room in draws, not in groups: it takes
another rq job (one or more prompt groups) whenever the draws of the groups it holds that are not yet
finished (requests in flight plus draws not yet sent) fall below its request window, which may
change as it runs (an adaptive concurrency window). A group waiting on one slow request then
holds one request of the window, not G: its finished draws' room goes to the next group at once.
The jobs held (drawing, or being recorded by rq) are bounded too (``max_jobs``: memory, and what
a dead worker leaves to re-dispatch). At least one job is always allowed, so a group larger
than the window still runs."""
from __future__ import annotations

import itertools
import math
import threading
from typing import Any, Callable


class JobSlots:
    """Runs of jobs held (taken, not yet recorded by rq) and, for each run still drawing, its draws
    not yet finished. A run is counted as its groups' draws from the moment it is taken (it may
    first wait for weights: its draws are not yet sent, but they are coming); a redraw round
    adds to its count (``more``); each finished draw lowers it (``draw_done``).

    Counted per run, not per rq job id: one job id may run twice on this worker at once (rq
    re-enqueues a failed job, its retry, before the failed run's thread releases it; a hung run
    whose heartbeat lapsed is re-dispatched, and this worker may take it again while the first
    run still draws). ``take`` returns the run's token and every other call names it, so one
    run's end frees its own count only."""

    def __init__(self, window: Callable[[], int], group_size: int = 1, max_jobs: int | None = None):
        self.window, self.group_size = window, max(1, group_size)
        self.max_jobs = max_jobs  # None: bounded by the window only (each drawing job holds a draw of it)
        self.held: dict[int, str] = {}  # run token -> its rq job id
        self.drawing: dict[int, int] = {}  # run token -> its draws not yet finished
        self.outstanding = 0  # their sum
        self.peak = 0  # most runs ever drawing at once (tests)
        self.peak_outstanding = 0  # most draws ever outstanding at once (tests)
        self._changed = threading.Condition()
        self._waiting = 0  # threads in wait_for_room
        self._tokens = itertools.count(1)

    @property
    def running(self) -> int:
        return len(self.held)

    @property
    def busy(self) -> bool:
        return bool(self.held)

    def has_room(self) -> bool:
        if self.max_jobs is not None and self.running >= max(1, self.max_jobs):
            return False
        return not self.drawing or self.outstanding < max(1, self.window())

    def wait_for_room(self, timeout: float) -> bool:
        """True once another job fits; False after ``timeout`` s (the caller beats and asks
        again: a window that grew is noticed then)."""
        with self._changed:
            self._waiting += 1
            try:
                return self._changed.wait_for(self.has_room, timeout)
            finally:
                self._waiting -= 1

    def take(self, job_id: str, draws: int | None = None) -> int:
        """A run of ``job_id`` is held from now, counted as ``draws`` draws (its groups' first
        rounds; unset: one group's) before any is sent: it may first wait for weights. Returns
        the run's token, which ``more``, ``draw_done``, ``drawn`` and ``release`` name."""
        with self._changed:
            run = next(self._tokens)
            self.held[run] = job_id
            self._set(run, self.group_size if draws is None else max(1, draws))
            self.peak = max(self.peak, len(self.drawing))
            return run

    def more(self, run: int, draws: int) -> None:
        """A redraw round of one of ``run``'s groups adds ``draws`` draws (its missing members)."""
        with self._changed:
            if run in self.drawing:
                self._set_and_tell(run, self.drawing[run] + draws)

    def draw_done(self, run: int, draws: int = 1) -> None:
        """``draws`` draws of ``run`` finished (a sample, an invalid one, or a failure), or will
        never be sent (a group skipped): their room goes to the next group."""
        with self._changed:
            if self.drawing.get(run, 0) > 0:
                self._set_and_tell(run, max(0, self.drawing[run] - draws))

    def drawn(self, run: int) -> None:
        """Every draw of ``run`` is done: rq records it now."""
        with self._changed:
            self._drop(run)
            self._changed.notify_all()

    def release(self, run: int) -> None:
        """``run`` ended (rq recorded it, or gave up): neither held nor drawing any more."""
        with self._changed:
            if self.held.pop(run, None) is None:
                return
            self._drop(run)
            self._changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: not self.held, timeout)

    def _set_and_tell(self, run: int, draws: int) -> None:
        """``_set``, then wake whoever waits for room, only if there is room now: a thread woken to
        find none goes back to sleep, and each wake-up costs CPU (G a group)."""
        self._set(run, draws)
        if self._waiting and self.has_room():
            self._changed.notify_all()

    def _set(self, run: int, draws: int) -> None:
        self.outstanding += draws - self.drawing.get(run, 0)
        self.drawing[run] = draws
        self.peak_outstanding = max(self.peak_outstanding, self.outstanding)

    def _drop(self, run: int) -> None:
        self.outstanding -= self.drawing.pop(run, 0)


def most_rows(cfg: Any) -> int:
    """The most draws a worker keeps in flight: a remote backend's request window
    (``inference.max_concurrency``; an adaptive window stays under it), or the local
    backend's ``workers.local_max_batch`` (unset: one group)."""
    if cfg.inference.remote:
        return cfg.inference.max_concurrency
    return cfg.workers.local_max_batch or cfg.completions_per_prompt


# Rows x tokens one local `generate` holds by default: a group of 8 with 1k-token completions, the
# memory one group per `generate` took before jobs carried several groups (docs/design.md §15.75 Several
# groups per rq job).
LOCAL_BATCH_TOKENS = 8192


def generate_rows(cfg: Any) -> int:
    """Most rows one local ``generate`` holds: ``workers.local_max_batch``, or as many rows of
    ``max_seq_len`` tokens (unset: ``max_completion_tokens``) as fit ``LOCAL_BATCH_TOKENS``, never
    fewer than one group: short completions batch a whole job, long ones stay one group per call."""
    if cfg.workers.local_max_batch:
        return cfg.workers.local_max_batch
    row_tokens = cfg.max_seq_len or cfg.max_completion_tokens
    return max(cfg.completions_per_prompt, LOCAL_BATCH_TOKENS // max(1, row_tokens))


def holds_several(cfg: Any) -> bool:
    return math.ceil(most_rows(cfg) / cfg.completions_per_prompt) > 1


def most_jobs(cfg: Any) -> int:
    """The jobs a worker holds at most (``workers.max_groups_held``; unset: as many as its window
    has draws, so that every group held can keep one request in flight, a straggler each)."""
    return cfg.workers.max_groups_held or most_rows(cfg)


def worker_slots(cfg: Any, controller: Any) -> JobSlots | None:
    """The worker's job slots, or None when it runs one group at a time: a remote backend
    fills its concurrency controller's current window; the local backend keeps
    ``workers.local_max_batch`` rows drawing."""
    if not holds_several(cfg):
        return None
    if cfg.inference.remote:
        window = lambda: controller.window  # noqa: E731
    else:
        rows = most_rows(cfg)
        window = lambda: rows  # noqa: E731
    return JobSlots(window, cfg.completions_per_prompt, most_jobs(cfg))
