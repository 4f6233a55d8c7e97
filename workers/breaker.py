"""Circuit breaker over prompt groups: a run whose rollouts keep failing across many rows
stops with the exception text instead of hanging or silently rejecting every group, while
a dataset with a few poison rows (a row whose every draw fails) loses those groups only.

It judges groups, not draws (docs/design.md §15.31 The circuit breaker judges rows, not
draws): a group that could not be sampled because its draws failed (exceptions or invalid
samples, after every retry and redraw round) is one failure, keyed by its row; a sampled
group is a success. The breaker trips when

- the groups that failed since the last sampled one span ``min_rows`` distinct rows, or
- at least ``ratio`` of the last ``window`` judged groups (a full window) failed, on at
  least ``min_rows`` distinct rows.

A single poison row, however often it comes back (every epoch, a re-dispatch), counts as
one row and never trips it, nor do fewer than ``min_rows`` of them; a rollout_fn that
fails on every row trips it after ``min_rows`` groups."""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

MIN_ROWS, WINDOW, RATIO = 5, 20, 0.5


class Outcome(NamedTuple):
    ok: bool
    row: int


class CircuitBreaker:
    def __init__(self, min_rows: int = MIN_ROWS, window: int = WINDOW, ratio: float = RATIO):
        self.min_rows, self.window, self.ratio = min_rows, window, ratio
        self.recent: deque[Outcome] = deque(maxlen=window)
        self.streak_rows: set[int] = set()  # rows of the groups failed since the last sampled one
        self.streak = 0
        self.last_row = -1
        self.last_error = ""

    def record(self, ok: bool, row: int, error: str = "") -> None:
        """One judged group: ``ok`` when it was sampled, else it failed on ``row`` with ``error``."""
        self.recent.append(Outcome(ok, row))
        if ok:
            self.streak_rows.clear()
            self.streak = 0
        else:
            self.streak_rows.add(row)
            self.streak += 1
            self.last_row, self.last_error = row, error

    def _window_failures(self) -> tuple[int, int]:
        """(failed groups, distinct failed rows) in the window."""
        failed = [o.row for o in self.recent if not o.ok]
        return len(failed), len(set(failed))

    @property
    def tripped(self) -> bool:
        if len(self.streak_rows) >= self.min_rows:
            return True
        failed, rows = self._window_failures()
        return len(self.recent) == self.window and failed >= self.ratio * self.window and rows >= self.min_rows

    def reason(self) -> str:
        if len(self.streak_rows) >= self.min_rows:
            groups, rows = f"{self.streak} prompt groups in a row", len(self.streak_rows)
        else:
            failed, rows = self._window_failures()
            groups = f"{failed} of the last {len(self.recent)} prompt groups"
        return (f"circuit breaker: {groups} on this worker could not be sampled, on {rows} different rows (their "
                "draws raised or returned invalid samples); last "
                f"error (row {self.last_row}): {self.last_error}. Fix the rollout_fn (the worker log lists every "
                "failure) and start the run again")
