"""The rq queue of rollout jobs, which the producer fills and the workers drain: its name,
serializer (JSON, never pickle) and default timeout, the job function both sides name, which
job carries which group (``job_of``), and the rq bookkeeping both sides must survive after a
kill. A job carries one or several prompt groups (docs/design.md §15.75 Several groups per
rq job); its id comes from ``keys.job_id`` of its first group.

rq 3.0 keeps, per job, an ``ExecutionRegistry`` (a sorted set of execution ids) next to
one hash per execution. A killed worker's execution hash expires with its heartbeat TTL
but its registry entry lives 60 s longer, and ``Job.delete`` fetches every entry, raising
``ValueError("Execution <id> not found in Redis")`` on such a one: a re-run job that
succeeds (``result_ttl=0`` deletes it) or a failed one the producer removes would crash.
``prune_dead_executions`` drops those entries first; ``delete_job`` deletes a job whatever
state a kill left it in.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterable

import redis
from rq import Queue
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer
from rq.utils import as_text, parse_composite_key

from rlstream.core import keys
from rlstream.core.config import Config
from rlstream.core.messages import GroupAdmitted

log = logging.getLogger(__name__)
# rq imports the job function by this name inside the worker process.
JOB_FUNC = "rlstream.workers.jobs.run_groups"
JOB_RETRIES = 2  # rq re-runs a failed or timed-out job this many times (no interval: that needs its scheduler)


def job_of(run_id: str, admitted: GroupAdmitted) -> str:
    """The rq job id of the job carrying an admitted group (events written before jobs
    carried several groups name none: the group's own)."""
    return admitted.job_id or keys.job_id(run_id, admitted.group_id)


def jobs_of(run_id: str, groups: Iterable[GroupAdmitted]) -> dict[str, list[GroupAdmitted]]:
    """``groups`` by the job carrying them, in the order given."""
    out: dict[str, list[GroupAdmitted]] = {}
    for g in groups:
        out.setdefault(job_of(run_id, g), []).append(g)
    return out


def carried(job: Job) -> list[dict]:
    """The groups a job's JSON payload carries, as dicts (a ``RolloutJob``'s, or the one
    ``GroupJob`` of a job an older producer enqueued); [] for a payload of any other shape: it
    came from Redis, so it is read, never trusted."""
    try:
        payload = job.args[0]
        groups = payload["groups"] if payload.get("kind") == "rollout_job" else [payload]
        return [g for g in groups if isinstance(g, dict)] if isinstance(groups, list) else []
    except (AttributeError, IndexError, KeyError, TypeError):
        return []


def job_queue(r: redis.Redis, cfg: Config) -> Queue:
    return Queue(keys.job_queue_name(cfg.run_id), connection=r, serializer=JSONSerializer,
                 default_timeout=cfg.job_timeout)


def prune_dead_executions(r: redis.Redis, job_id: str) -> int:
    """Remove the job's ExecutionRegistry entries whose execution hash is gone (a killed
    worker's); return how many. Live executions are untouched: rq writes an execution's
    hash and its entry in one MULTI, and deletes both in one."""
    key = ExecutionRegistry(job_id, connection=r).key
    ids = [as_text(e) for e in r.zrange(key, 0, -1)]
    if not ids:
        return 0
    with r.pipeline(transaction=False) as pipe:
        for execution_id in ids:
            pipe.exists(Execution(execution_id, job_id, connection=r).key)
        present = pipe.execute()
    dead = [e for e, exists in zip(ids, present) if not exists]
    if dead:
        r.zrem(key, *dead)
        log.debug("job %s: dropped %d dead execution(s) from its registry", job_id, len(dead))
    return len(dead)


def delete_job(queue: Queue, job_id: str) -> None:
    """Delete a job and every trace rq keeps of it (queue, intermediate queue, failed and
    started registries, executions), whatever state a killed process left it in."""
    r = queue.connection
    with r.pipeline(transaction=True) as pipe:  # the places rq's Job.delete may not look
        pipe.lrem(queue.key, 0, job_id)
        pipe.lrem(queue.intermediate_queue_key, 0, job_id)
        pipe.zrem(FailedJobRegistry(queue=queue).key, job_id)
        pipe.execute()
    for attempt in range(2):  # a second pass only if an execution died between prune and delete
        prune_dead_executions(r, job_id)
        job = queue.fetch_job(job_id)  # None when the hash is gone
        if job is None:
            break
        try:
            job.delete()
            break
        except ValueError as exc:  # "Execution ... not found in Redis"
            if attempt:
                log.warning("job %s: rq could not delete it (%s); deleting its keys directly", job_id, exc)
    started = StartedJobRegistry(queue=queue)
    with r.pipeline(transaction=True) as pipe:
        for entry in r.zrange(started.key, 0, -1):
            if parse_composite_key(as_text(entry))[0] == job_id:
                pipe.zrem(started.key, entry)
        pipe.delete(Job.key_for(job_id), Result.get_key(job_id), ExecutionRegistry(job_id, connection=r).key)
        pipe.execute()


@dataclass(frozen=True)
class JobPlace:
    """Where a job is in rq's bookkeeping, from one consistent snapshot (``job_places``)."""

    exists: bool  # its hash
    status: str  # rq's status field ('' when absent)
    queued: bool  # in the queue's list: a worker will take it
    dequeued: bool  # in the intermediate queue: taken, not started yet (milliseconds, unless the worker died)
    started: bool  # in the StartedJobRegistry with an unexpired entry: a live worker beats for it
    failed: bool  # in the FailedJobRegistry: the producer handles it

    @property
    def live(self) -> bool:
        """Somewhere rq (or the producer's failed-job handling) will move it on from."""
        return self.queued or self.started or self.failed


def job_places(queue: Queue, job_ids: list[str]) -> dict[str, JobPlace]:
    """Where each job is, read in one MULTI so that no move between lists is seen half done."""
    if not job_ids:
        return {}
    r, now = queue.connection, time.time()
    started, failed = StartedJobRegistry(queue=queue), FailedJobRegistry(queue=queue)
    with r.pipeline(transaction=True) as pipe:
        pipe.lrange(queue.key, 0, -1)
        pipe.lrange(queue.intermediate_queue_key, 0, -1)
        pipe.zrangebyscore(started.key, now, "+inf")
        pipe.zrange(failed.key, 0, -1)
        for job_id in job_ids:
            pipe.hget(Job.key_for(job_id), "status")
            pipe.exists(Job.key_for(job_id))
        replies = pipe.execute()
    queued, dequeued = {as_text(j) for j in replies[0]}, {as_text(j) for j in replies[1]}
    running = {parse_composite_key(as_text(e))[0] for e in replies[2]}
    failed_ids = {as_text(j) for j in replies[3]}
    out = {}
    for i, job_id in enumerate(job_ids):
        status, exists = replies[4 + 2 * i], replies[5 + 2 * i]
        out[job_id] = JobPlace(exists=bool(exists), status=as_text(status) if status else "",
                               queued=job_id in queued, dequeued=job_id in dequeued, started=job_id in running,
                               failed=job_id in failed_ids)
    return out
