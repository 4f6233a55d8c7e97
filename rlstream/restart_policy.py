"""The supervisor's restart policy (``rlstream up``): when a crashed process is started again,
after how long, and when the run gives up on it (docs/design.md §15.83 Restarts give up only on
a crash loop).

A supervisor must tell a crash loop (a process that dies again right after it starts, the run
making no progress in between) from separate incidents, as systemd's start-limit interval and
Kubernetes' back-off do. A lifetime count cannot: a week-long run would end on its fourth
unrelated Redis crash, however far apart. So a crash is *quick* when the process ran less than
``min_uptime_s()`` and the run committed no step since it started (a launched inference server
that never answered its health check since it started crashed quickly whatever its uptime: its
start takes minutes); a crash that is not quick is a new incident and starts the count again.
The run gives up after more than ``max_restarts()`` quick crashes in a row, never on a lifetime
count. The back-off before a restart doubles with the quick crashes in a row (1 s, 2 s, 4 s, ...
at most ``BACKOFF_CAP_S``) and is 1 s after an incident.

Both thresholds are the operator's call, set in the environment (they are not part of a run's
config: how hard to try depends on the machine, not on the experiment):
``RLSTREAM_MAX_RESTARTS`` (default 3) and ``RLSTREAM_MIN_UPTIME_S`` (default 60).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from rlstream.core.errors import RunFailed

MAX_RESTARTS = 3
MAX_RESTARTS_ENV = "RLSTREAM_MAX_RESTARTS"
MIN_UPTIME_S = 60.0
MIN_UPTIME_ENV = "RLSTREAM_MIN_UPTIME_S"
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0


def max_restarts() -> int:
    """Quick crashes in a row after which the run gives up on a process."""
    value = os.environ.get(MAX_RESTARTS_ENV, "")
    if value and not value.isdigit():
        raise RunFailed(f"{MAX_RESTARTS_ENV}={value!r} is not a whole number: unset it or set e.g. {MAX_RESTARTS}")
    return int(value) if value else MAX_RESTARTS


def min_uptime_s() -> float:
    """Seconds a process must run (or the run commit a step meanwhile) for its crash to count
    as a new incident rather than part of a crash loop."""
    value = os.environ.get(MIN_UPTIME_ENV, "")
    try:
        seconds = float(value) if value else MIN_UPTIME_S
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise RunFailed(f"{MIN_UPTIME_ENV}={value!r} is not a number of seconds >= 0: unset it or set e.g. "
                        f"{MIN_UPTIME_S:.0f}")
    return seconds


def check_settings() -> None:
    """Fail now, naming the variable, rather than at the first crash."""
    max_restarts()
    min_uptime_s()


@dataclass
class RestartPolicy:
    """One supervised process's record: when it (re)started, the run's committed steps then, and
    its quick crashes in a row. ``started`` at every start; ``crashed`` at every crash, which
    returns the back-off before the next start or raises ``RunFailed`` on a crash loop."""

    name: str
    started_at: float = field(default_factory=time.monotonic)
    steps_at_start: int = 0
    quick_crashes: int = 0  # in a row
    restarts: int = 0  # over the run's life: for the logs and the operator, never a limit
    note: str = ""  # what the last crash was, for the supervisor's log line

    def started(self, steps: int, now: float | None = None) -> None:
        self.started_at = time.monotonic() if now is None else now
        self.steps_at_start = steps

    def crashed(self, steps: int, what: str, now: float | None = None, came_up: bool = True) -> float:
        """``what``: how it ended (e.g. "exited with code 1"), for the messages; ``came_up``: False
        for a server that never became healthy since its start. The seconds to wait before
        starting it again; ``RunFailed`` when this crash completes a crash loop."""
        now = time.monotonic() if now is None else now
        uptime = now - self.started_at
        quick = not came_up or (uptime < min_uptime_s() and steps == self.steps_at_start)
        self.quick_crashes = self.quick_crashes + 1 if quick else 0
        if self.quick_crashes > max_restarts():
            raise RunFailed(
                f"{self.name} {what}: a crash loop, {self.quick_crashes} crashes in a row each within "
                f"{min_uptime_s():.0f}s of its start with no step committed in between (RLSTREAM_MAX_RESTARTS="
                f"{max_restarts()}, RLSTREAM_MIN_UPTIME_S={min_uptime_s():.0f}; {self.restarts} restarts in this "
                "run). Fix what its log shows; raise those variables only to let it try longer")
        self.restarts += 1
        self.note = (f"{uptime:.0f}s after its start, " + (f"quick crash {self.quick_crashes} of at most "
                     f"{max_restarts()} in a row" if quick else "a new incident") + f"; restart {self.restarts} "
                     "of this run")
        return min(BACKOFF_BASE_S * 2 ** max(0, self.quick_crashes - 1), BACKOFF_CAP_S)
