"""Schedules: the learning-rate multiplier of each optimizer step, and when periodic work
(writing weights, checkpoints) is due."""
from __future__ import annotations

import math


def lr_multiplier(step: int, *, schedule: str, warmup_steps: int, total_steps: int | None) -> float:
    """``step`` counts optimizer steps already taken (0 for the first). Linear warmup from
    1/(warmup+1), then ``constant``, ``linear`` decay to 0 at ``total_steps``, or ``cosine``
    decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    if total_steps is None:
        raise ValueError(f"lr_schedule {schedule!r} needs max_steps")
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr_schedule {schedule!r}")


def due(interval: int | None, count: int) -> bool:
    """Periodic work every ``interval`` steps or versions; 0 or None means never."""
    return bool(interval) and count % interval == 0
