"""Circuit breaker over rollout_fn outcomes: a run whose rollouts keep failing stops with
the exception text instead of hanging or silently training on nothing."""
from __future__ import annotations

from collections import deque


class CircuitBreaker:
    """Trips after ``max_consecutive`` failures in a row, or when at least ``ratio`` of the
    last ``window`` outcomes (a full window) failed."""

    def __init__(self, max_consecutive: int = 5, window: int = 20, ratio: float = 0.5):
        self.max_consecutive, self.window, self.ratio = max_consecutive, window, ratio
        self.recent: deque[bool] = deque(maxlen=window)
        self.consecutive = 0
        self.failures = 0
        self.last_error = ""

    def record(self, ok: bool, error: str = "") -> None:
        self.recent.append(ok)
        if ok:
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.failures += 1
            self.last_error = error

    @property
    def tripped(self) -> bool:
        if self.consecutive >= self.max_consecutive:
            return True
        full = len(self.recent) == self.window
        return full and self.recent.count(False) >= self.ratio * self.window

    def reason(self) -> str:
        return (f"circuit breaker: {self.consecutive} consecutive rollout failures (exceptions or invalid samples), "
                f"{self.recent.count(False)} of the last {len(self.recent)}; last error: {self.last_error}. "
                "Fix the rollout_fn (the worker log lists every failure) and start the run again")
