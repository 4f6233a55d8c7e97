"""The ``perf/*`` family of a live run's metrics line: where the wall time of each step went
(waiting for rollouts, computing, writing weights), how fast the workers produced, how long the
sampler side stood idle for the trainer, and how much of the sampling was hidden behind
training. The definitions are docs/operations.md's ("Perf and rollout metrics").

``PerfClock`` is the trainer's stopwatch: it keeps the few timestamps and counters of earlier
steps the rates and the overlap need; the arithmetic is in pure functions below it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from rlstream.core import keys
from rlstream.core.messages import RolloutRecord
from rlstream.core.run_state import RunState
from rlstream.trainer.batch import Group

BUSY_KEPT = 256  # trainer busy intervals remembered: far more steps than any sample can be behind


@dataclass
class PerfClock:
    """Timestamps between steps. ``restart`` when the loop starts (after resume and the first
    evaluation); ``weights_written`` with the seconds the step spent on a weight sync,
    ``weights_sealed`` with those a version's directory took to write; ``line`` once a step."""

    last_line: float = field(default_factory=time.monotonic)  # monotonic time of the previous line
    busy_since: float = field(default_factory=time.time)  # wall clock the trainer last stopped waiting
    busy: deque = field(default_factory=lambda: deque(maxlen=BUSY_KEPT))  # (wall start, wall end) not waiting
    sampled: tuple[int, int] = (0, 0)  # state.sampled_samples, sampled_tokens at the previous line
    gate_closed_ms: int | None = None
    weight_write_s: float = 0.0  # the step's own time on its weight sync
    weight_sealed_s: float = 0.0  # writing and sealing directories, wherever that ran

    def restart(self, state: RunState, stats: dict[str, int]) -> None:
        self.last_line, self.busy_since, self.weight_write_s, self.weight_sealed_s = \
            time.monotonic(), time.time(), 0.0, 0.0
        self.sampled = (state.sampled_samples, state.sampled_tokens)
        self.gate_closed_ms = stats.get(keys.GATE_CLOSED_MS, 0)

    def weights_written(self, seconds: float) -> None:
        """Seconds the step's thread spent on a weight sync (the snapshot, a wait for the previous
        version, or a whole synchronous write)."""
        self.weight_write_s += seconds

    def weights_sealed(self, seconds: float) -> None:
        """Seconds a finished version's directory took to write and seal (on the writer's thread,
        beside the next step, or on the step's own)."""
        self.weight_sealed_s += seconds

    def line(self, groups: list[Group], wait_time: float, compute_began: float, state: RunState,
             stats: dict[str, int]) -> dict[str, float]:
        """The perf metrics of the step on ``groups``; ``compute_began``: wall clock it stopped waiting."""
        now = time.monotonic()
        wall = max(now - self.last_line, 1e-9)
        self.busy.append((self.busy_since, compute_began - wait_time))  # busy until this step's wait began
        self.busy_since = compute_began
        gate = stats.get(keys.GATE_CLOSED_MS, 0)
        samples_n, tokens_n = state.sampled_samples - self.sampled[0], state.sampled_tokens - self.sampled[1]
        line = {
            "perf/step_time": wall,
            "perf/trainer_wait_for_sampler_time": wait_time,
            "perf/sampler_wait_for_trainer_time": (gate - (self.gate_closed_ms or 0)) / 1000,
            "perf/weight_update_time": self.weight_write_s,
            "perf/weight_write_time": self.weight_sealed_s,
            "perf/rollout_samples_per_s": samples_n / wall,
            "perf/rollout_tokens_per_s": tokens_n / wall,
        }
        overlap = overlap_ratio(sampling_windows([s for g in groups for s in g.samples]), list(self.busy))
        if overlap is not None:
            line["perf/overlap_ratio"] = overlap
        self.last_line, self.gate_closed_ms, self.weight_write_s, self.weight_sealed_s = now, gate, 0.0, 0.0
        self.sampled = (state.sampled_samples, state.sampled_tokens)
        return line


def sampling_windows(samples: list[RolloutRecord]) -> list[tuple[float, float, int]]:
    """(start, end, samples) of each sampling window in the batch (one per group: its members
    share it); samples without timestamps (older workers) are left out."""
    windows: dict[tuple[float, float], int] = {}
    for s in samples:
        if s.started_at > 0 and s.finished_at >= s.started_at:
            windows[(s.started_at, s.finished_at)] = windows.get((s.started_at, s.finished_at), 0) + 1
    return [(a, b, n) for (a, b), n in windows.items()]


def overlap_ratio(windows: list[tuple[float, float, int]], busy: list[tuple[float, float]]) -> float | None:
    """The share of the batch's sampling time (each window weighted by its samples) that ran
    while the trainer was busy (not waiting for rollouts). None without timed windows; a batch
    sampled in zero time counts as not overlapped."""
    if not windows:
        return None
    total = sum((b - a) * n for a, b, n in windows)
    if total <= 0:
        return 0.0
    # Only busy intervals that reach into the batch's span can overlap a window; every other
    # one adds exactly 0.0 (the deque holds up to BUSY_KEPT: 32 windows x 256 intervals was ~1 ms).
    lo, hi = min(a for a, _, _ in windows), max(b for _, b, _ in windows)
    near = [(bs, be) for bs, be in busy if be > lo and bs < hi]
    hidden = sum(n * sum(max(0.0, min(b, be) - max(a, bs)) for bs, be in near) for a, b, n in windows)
    return min(1.0, hidden / total)
