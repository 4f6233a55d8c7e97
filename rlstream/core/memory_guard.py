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
