"""The memory guard (docs/design.md §15.48 A memory guard before Redis refuses writes): Redis
runs with a ``maxmemory`` and ``noeviction``, so at the limit it refuses every write that
grows memory, the trainer's commit script included. Before that, at
``retention.memory_high_water`` of the limit, the producer stops admitting groups and the
trainer checkpoints early, which archives and trims the rollouts the checkpoint covers.

The embedded server's limit defaults to half the machine's memory (the other half is for
the model processes); an external server's own ``maxmemory`` is read (0 there: no guard).
"""
from __future__ import annotations

import logging
import os

import redis

log = logging.getLogger(__name__)
MIB = 1 << 20


def machine_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every OS exposes these
        return None


def embedded_maxmemory_mb(configured: int | None) -> int:
    """The embedded server's maxmemory in MiB: the configured one, else half the machine's
    memory (0 = no limit: also when the machine's memory cannot be read)."""
    if configured is not None:
        return configured
    total = machine_memory_bytes()
    return total // 2 // MIB if total else 0


def memory_use(r: redis.Redis) -> tuple[int | None, int]:
    """(used_memory, maxmemory) in bytes; (None, 0) when the server does not say (fakeredis
    has no INFO)."""
    try:
        info = r.info("memory")
    except (redis.ResponseError, AttributeError, NotImplementedError):
        return None, 0
    used = info.get("used_memory")
    return (int(used) if used is not None else None), int(info.get("maxmemory", 0) or 0)


def memory_pressure(r: redis.Redis, high_water: float) -> float | None:
    """used / maxmemory when it is at or above ``high_water`` (else None; also when the
    server has no limit or does not say)."""
    used, limit = memory_use(r)
    if used is None or limit <= 0:
        return None
    fraction = used / limit
    return fraction if fraction >= high_water else None


class AdmissionGuard:
    """The producer's back-pressure: ``closed(r)`` says whether admission must pause (Redis
    past the high-water mark), logging each change once, with what to do when it lasts."""

    def __init__(self, high_water: float):
        self.high_water, self.paused = high_water, False

    def closed(self, r: redis.Redis) -> bool:
        fraction = memory_pressure(r, self.high_water)
        if (fraction is not None) != self.paused:
            self.paused = fraction is not None
            if self.paused:
                log.warning("producer: Redis is at %.0f%% of its maxmemory (high water %.0f%%): admission paused until "
                            "the trainer's next checkpoint archives and trims the rollouts. If it stays paused, raise "
                            "redis.maxmemory_mb or lower dcp_save_interval", 100 * fraction, 100 * self.high_water)
            else:
                log.info("producer: Redis memory is below the high-water mark again: admission resumed")
        return self.paused
