"""``rlstream worker-alive CONFIG``: a worker container's liveness probe (docs/operating.md,
Autoscaling). Exit 0 while an rq worker of this run on this host (rq names it
``rlstream-<run>-<host>-<pid>``: rlstream/workers/main.py) has sent rq a heartbeat within
``max_age_s``; 1 otherwise, saying what it found.

rq keeps each worker's heartbeat in Redis (``rq:worker:<name>``, refreshed while it waits
for jobs and while it runs them), so the probe asks Redis, not the worker process: a worker
whose loop hangs stops refreshing it, and the orchestrator restarts the container. The
probe reads, never writes.
"""
from __future__ import annotations

import logging
import socket

import redis

from rlstream.core import keys

log = logging.getLogger(__name__)
MAX_AGE_S = 60.0  # rq refreshes a waiting worker's heartbeat every ~10 s (worker_ttl 25 s)


def heartbeats(r: redis.Redis, run_id: str, host: str) -> dict[str, float]:
    """Seconds since the last heartbeat of each rq worker of ``run_id`` on ``host``."""
    from rq import Worker
    from rq.utils import now

    prefix = f"rlstream-{run_id}-{host}-"
    ages = {}
    for worker in Worker.all(connection=r):
        if worker.name.startswith(prefix) and worker.last_heartbeat is not None:
            ages[worker.name] = (now() - worker.last_heartbeat).total_seconds()
    return ages


def worker_alive_main(r: redis.Redis, run_id: str, max_age_s: float = MAX_AGE_S, host: str | None = None) -> int:
    host = host or socket.gethostname()
    ages = heartbeats(r, run_id, host)
    fresh = {name: age for name, age in ages.items() if age <= max_age_s}
    if fresh:
        print(f"alive: {', '.join(sorted(fresh))} (last heartbeat {min(fresh.values()):.0f}s ago)")
        return 0
    found = ", ".join(f"{name} {age:.0f}s ago" for name, age in sorted(ages.items())) or "none"
    print(f"not alive: no worker of run {run_id} on {host} sent rq a heartbeat within {max_age_s:.0f}s "
          f"(found: {found}; queue {keys.job_queue_name(run_id)})")
    return 1
