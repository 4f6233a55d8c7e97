"""Bounds on open groups whose rq job nothing will move on (issue "Reliability II" item 2).

An admitted group that no worker has sampled yet has a job (its own, or one it shares with
other groups) somewhere in rq's bookkeeping.
Most places move on by themselves: the queue (a worker takes it), the StartedJobRegistry
(a live worker beats for it; a dead one's entry expires and the producer's cleanup
re-enqueues it) and the FailedJobRegistry (``handle_failed_jobs``). A kill between two
of rq's writes can leave a job in none of them, forever:

- a worker SIGKILLed between taking the job (BLMOVE into the intermediate queue) and
  starting it: rq recovers those only in a worker's 10-minute maintenance;
- the producer killed between ``FailedJobRegistry.requeue``'s ZREM and its enqueue;
- a job whose started entry expired while its status was not ``started`` (rq's cleanup
  drops the entry and leaves the job alone), or one left ``scheduled`` (no scheduler runs).

``JobWatch`` turns each of these into a bounded wait: a job seen out of every live place
for ``STRANDED_GRACE_S`` (rq's own moves between places take milliseconds), or started for
longer than ``started_bound_s`` (past rq's timeout, our hung-job grace and the heartbeat
TTL), is re-dispatched; the producer rejects its groups, with the reason, after
``MAX_REDISPATCH`` re-dispatches. Clocks are kept per job id. A job waiting in the queue is left alone (it waits for a
worker; ``rlstream up`` restarts dead ones), with a warning once it waits past
``queued_warn_s``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from rlstream.core.jobs import JobPlace

log = logging.getLogger(__name__)
STRANDED_GRACE_S = 15.0


def started_bound_s(job_timeout: int) -> float:
    """Longest a job may stay started: rq's timeout, the worker's hung-job grace (10 s) and
    heartbeat TTL (<= 15 s) add up to well under 2 x timeout + 60 s."""
    return 2.0 * job_timeout + 60.0


def queued_warn_s(job_timeout: int) -> float:
    return 2.0 * job_timeout


def describe(place: JobPlace) -> str:
    where = "in the intermediate queue (taken by a worker that died before starting it)" if place.dequeued \
        else "in no queue or registry"
    return f"status {place.status or 'unset'!r}, {where}"


@dataclass
class JobWatch:
    """Per-job clocks (this process's monotonic time; a restarted producer starts them
    afresh, which only delays a verdict)."""

    job_timeout: int
    grace_s: float = STRANDED_GRACE_S
    stranded_since: dict[str, float] = field(default_factory=dict)
    started_since: dict[str, float] = field(default_factory=dict)
    queued_since: dict[str, float] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)

    def overdue(self, places: dict[str, JobPlace], now: float) -> dict[str, str]:
        """{job id: why it must be re-dispatched} among ``places`` (job id -> its place, for
        the jobs of open, unsampled groups whose hash exists). Jobs not in ``places`` are
        forgotten."""
        for clocks in (self.stranded_since, self.started_since, self.queued_since):
            for job_id in list(clocks):
                if job_id not in places:
                    del clocks[job_id]
        self.warned &= set(places)
        out = {}
        for job_id, place in places.items():
            self._tick(self.stranded_since, job_id, not place.live, now)
            self._tick(self.started_since, job_id, place.started and not place.queued and not place.failed, now)
            self._tick(self.queued_since, job_id, place.queued, now)
            if job_id in self.stranded_since and now - self.stranded_since[job_id] >= self.grace_s:
                since = self.stranded_since[job_id]
                out[job_id] = f"its rq job was stranded for {now - since:.0f}s ({describe(place)})"
            elif job_id in self.started_since and now - self.started_since[job_id] > started_bound_s(self.job_timeout):
                out[job_id] = (f"its rq job ran for {now - self.started_since[job_id]:.0f}s, past "
                            f"{started_bound_s(self.job_timeout):.0f}s (2 x job_timeout + 60)")
            elif (job_id in self.queued_since and now - self.queued_since[job_id] > queued_warn_s(self.job_timeout)
                  and job_id not in self.warned):
                self.warned.add(job_id)
                log.warning("job %s: it has waited %.0fs in the queue for a worker; if no worker runs, "
                            "start one (`rlstream worker <config>`) or check the worker logs", job_id,
                            now - self.queued_since[job_id])
        for job_id in out:
            self.stranded_since.pop(job_id, None)
            self.started_since.pop(job_id, None)
        return out

    @staticmethod
    def _tick(clock: dict[str, float], job_id: str, condition: bool, now: float) -> None:
        if condition:
            clock.setdefault(job_id, now)
        else:
            clock.pop(job_id, None)
