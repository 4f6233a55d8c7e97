"""Restarts by role, recorded in Redis (``keys.restarts``: role -> count) so that the run's
metrics exporter, wherever it runs, can serve them (docs/operating.md).

`rlstream up`'s supervisor owns the restart policy; this module only *observes* it: once a
pass, ``RestartLog.observe`` compares each supervised process object (children, launched
engines, the embedded redis-server) with the one it saw last, and a new object is one
restart (or restart attempt) of that role. Observing instead of hooking each restart path
keeps the policy's code free of bookkeeping. A count that cannot be written (Redis is down:
e.g. it is the embedded server being restarted) is kept and written on a later pass.
A run started role by role has no supervisor here: its restarts are the orchestrator's
(systemd's NRestarts, Kubernetes' restartCount).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterable

import redis

from rlstream.core import keys

log = logging.getLogger(__name__)
ROLES = ("trainer", "producer", "worker", "redis", "engine")  # the label values, always served (0 until one)


def restart_counts(r: redis.Redis, run_id: str) -> dict[str, int]:
    """role -> restarts recorded for the run (every role of ``ROLES``, 0 when none)."""
    stored = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in r.hgetall(keys.restarts(run_id)).items()}
    return {**dict.fromkeys(ROLES, 0), **stored}


class RestartLog:
    """Counts restarts by watching process objects change (see the module docstring)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.seen: dict[str, Any] = {}  # supervised name -> the process object seen last
        self.unwritten: Counter[str] = Counter()

    def observe(self, r: redis.Redis, children: Iterable[Any], engines: Iterable[Any] = (),
                embedded: Any = None) -> None:
        supervised = [(c.name, c.role, c.process) for c in children]
        supervised += [(e.name, "engine", e.process) for e in engines]
        if embedded is not None:
            supervised.append(("redis", "redis", embedded.process))
        for name, role, process in supervised:
            if process is None:
                continue
            previous = self.seen.get(name)
            self.seen[name] = process
            if previous is not None and previous is not process:
                self.unwritten[role] += 1
        if not self.unwritten:
            return
        try:
            with r.pipeline() as pipe:  # MULTI: all or none, so a retry never counts twice
                for role, n in self.unwritten.items():
                    pipe.hincrby(keys.restarts(self.run_id), role, n)
                pipe.execute()
            self.unwritten.clear()
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError) as exc:  # written on a later pass
            # (ResponseError: MISCONF, a server that cannot write its AOF: up stops the run on it, rlstream.core.disk)
            log.debug("restart counts not written yet (%s)", exc)
