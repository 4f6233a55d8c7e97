"""The producer: admits prompt groups under the gate and enqueues one rq job per group.

State is a fold over the events stream, so a restarted producer skips rows that were
already admitted. Admission is row-atomic: the rq job and its ``GroupAdmitted`` event are
written in one MULTI/EXEC. Jobs use rq's JSON serializer, never pickle.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry

from rlstream.core import bus, keys
from rlstream.core.config import Config
from rlstream.core.fold_snapshot import start_fold
from rlstream.core.jobs import JOB_FUNC, JOB_RETRIES, delete_job, job_places, job_queue
from rlstream.core.memory_guard import AdmissionGuard
from rlstream.core.messages import DatasetExhausted, GroupAdmitted, GroupJob, GroupRejected, group_id_for
from rlstream.core.run_state import RunState
from rlstream.producers.datasets import epoch_order, load_rows
from rlstream.producers.gate import can_admit, staleness_capacity
from rlstream.producers.stranded import JobWatch

log = logging.getLogger(__name__)
MAINTENANCE_EVERY_S = 2.0
MAX_REDISPATCH = 3


def admission_order(cfg: Config, n_rows: int) -> Iterator[tuple[int, int]]:
    """(epoch, row_index) in admission order."""
    for epoch in range(cfg.epochs):
        for row_index in epoch_order(n_rows, epoch, cfg.seed, cfg.shuffle):
            yield epoch, row_index


def job_data(cfg: Config, admitted: GroupAdmitted, row: dict[str, Any]) -> Any:
    """The rq job of an admitted group (JSON, never pickle); its id is derived from the
    group id, so a re-dispatch is the same job and its samples deduplicate by sample_id."""
    job = GroupJob(run_id=cfg.run_id, group_id=admitted.group_id, row_index=admitted.row_index,
                   epoch=admitted.epoch, attempt=admitted.attempt, submit_version=admitted.submit_version,
                   group_size=admitted.group_size, row=row)
    return Queue.prepare_data(JOB_FUNC, args=(job.model_dump(mode="json"),),
                              job_id=keys.job_id(cfg.run_id, admitted.group_id),
                              timeout=cfg.job_timeout, result_ttl=0, failure_ttl=7 * 86400,
                              retry=Retry(max=JOB_RETRIES))


def admit(r: redis.Redis, queue: Queue, cfg: Config, epoch: int, row_index: int,
          row: dict[str, Any], version: int, attempt: int = 0) -> GroupAdmitted:
    event = GroupAdmitted(group_id=group_id_for(epoch, row_index, attempt), row_index=row_index, epoch=epoch,
                          attempt=attempt, submit_version=version, group_size=cfg.completions_per_prompt)
    with r.pipeline(transaction=True) as pipe:
        queue.enqueue_many([job_data(cfg, event, row)], pipeline=pipe)
        bus.xadd(pipe, keys.events(cfg.run_id), event)
        pipe.execute()
    return event


def jobless_groups(r: redis.Redis, cfg: Config, state: RunState) -> list[GroupAdmitted]:
    """Open groups that no worker has written and whose rq job no longer exists. The job
    hash lives from the admission's MULTI until the job succeeds (``result_ttl=0``), and a
    job writes ``GroupSampled`` before it succeeds, so such a group was lost with Redis's
    last writes (an OS crash under ``appendfsync everysec``), by hand, or by a producer
    killed between deleting a stranded job and enqueueing it again. Call it *before*
    folding the newest events: a job that succeeded meanwhile has its GroupSampled there."""
    candidates = state.unsampled_groups
    if not candidates:
        return []
    with r.pipeline(transaction=False) as pipe:
        for g in candidates:
            pipe.exists(Job.key_for(keys.job_id(cfg.run_id, g.group_id)))
        present = pipe.execute()
    return [g for g, exists in zip(candidates, present) if not exists]


def redispatch(r: redis.Redis, queue: Queue, cfg: Config, groups: list[GroupAdmitted], rows: list[dict]) -> None:
    for g in groups:
        log.warning("group %s: admitted but its job and samples are gone (lost Redis writes?); re-dispatching",
                    g.group_id)
    if groups:
        queue.enqueue_many([job_data(cfg, g, rows[g.row_index]) for g in groups])


def handle_failed_jobs(r: redis.Redis, queue: Queue, cfg: Config, state: RunState,
                       redispatched: dict[str, int]) -> None:
    """Jobs whose rq retries are spent. One abandoned by dead workers is re-dispatched (same
    job id, so its samples deduplicate by sample_id), up to ``MAX_REDISPATCH`` times; any
    other failure rejects the group explicitly, freeing its gate slots. A group whose
    samples were written (``GroupSampled``) is the trainer's business: its spent job is only
    removed. Fold the events first: a job fails only after its GroupSampled was written."""
    registry = FailedJobRegistry(queue=queue)
    for job_id in registry.get_job_ids(cleanup=False):
        try:
            _handle_failed_job(r, queue, cfg, state, redispatched, registry, job_id)
        except (ValueError, NoSuchJobError, InvalidJobOperation) as exc:
            # rq's bookkeeping after a kill (e.g. a job hash or execution gone): never crash
            # on it. The job is deleted; the group, still open, is then re-dispatched as jobless.
            log.warning("failed job %s: rq could not handle it (%s); deleting it", job_id, exc)
            delete_job(queue, job_id)


def _handle_failed_job(r: redis.Redis, queue: Queue, cfg: Config, state: RunState, redispatched: dict[str, int],
                       registry: FailedJobRegistry, job_id: str) -> None:
    gid = keys.group_of_job(cfg.run_id, job_id)
    job = queue.fetch_job(job_id)
    result = job.latest_result() if job is not None else None
    error = (result.exc_string or "").strip().splitlines()[-1][:300] if result and result.exc_string else ""
    if gid not in state.admitted or gid in state.settled_groups or gid in state.sampled:
        delete_job(queue, job_id)
    elif job is None:
        registry.remove(job_id)  # hash gone: the group is jobless and is re-dispatched as such
    elif "Abandoned" in error and redispatched.get(gid, 0) < MAX_REDISPATCH:
        redispatched[gid] = redispatched.get(gid, 0) + 1
        log.warning("group %s: job abandoned by a dead worker; re-dispatching (%d)", gid, redispatched[gid])
        registry.requeue(job_id)
    else:
        reject(r, queue, cfg, gid, f"rollout job failed: {error}" if error else "rollout job failed")


def reject(r: redis.Redis, queue: Queue, cfg: Config, gid: str, reason: str) -> None:
    """Reject a group explicitly (frees its gate slots), then delete its job: killed in
    between, a restarted producer finds the group settled and deletes the job."""
    log.error("group %s rejected: %s", gid, reason)
    bus.xadd(r, keys.events(cfg.run_id), GroupRejected(group_id=gid, reason=reason, by="producer"))
    delete_job(queue, keys.job_id(cfg.run_id, gid))


def stranded_groups(queue: Queue, cfg: Config, state: RunState, watch: JobWatch, now: float) -> dict[str, str]:
    """{group id: reason} of open, unsampled groups whose job exists but no process will
    move on (``producers.stranded``). Call it *before* folding the newest events, and
    re-check ``unsampled_groups`` after folding (as for ``jobless_groups``)."""
    groups = state.unsampled_groups
    places = job_places(queue, [keys.job_id(cfg.run_id, g.group_id) for g in groups])
    return watch.overdue({g.group_id: places[keys.job_id(cfg.run_id, g.group_id)] for g in groups
                          if places[keys.job_id(cfg.run_id, g.group_id)].exists}, now)


def redispatch_stranded(r: redis.Redis, queue: Queue, cfg: Config, state: RunState, overdue: dict[str, str],
                        rows: list[dict], redispatched: dict[str, int]) -> None:
    """Delete each stranded job and enqueue it afresh (same job id), at most
    ``MAX_REDISPATCH`` times per group; then reject the group with the reason."""
    for gid, why in overdue.items():
        if redispatched.get(gid, 0) >= MAX_REDISPATCH:
            reject(r, queue, cfg, gid, f"{why}; re-dispatched {MAX_REDISPATCH} times already")
            continue
        redispatched[gid] = redispatched.get(gid, 0) + 1
        log.warning("group %s: %s; re-dispatching (%d of %d)", gid, why, redispatched[gid], MAX_REDISPATCH)
        delete_job(queue, keys.job_id(cfg.run_id, gid))  # killed here: the group is jobless, re-dispatched as such
        group = state.admitted[gid]
        queue.enqueue_many([job_data(cfg, group, rows[group.row_index])])


def events_rolled_back(r: redis.Redis, cfg: Config, cursor: str) -> bool:
    """True when the event we last read (``cursor``) is gone: Redis restarted and lost its
    last writes (an OS crash with ``appendfsync everysec``), so re-fold from 0. Comparing
    with the stream's last id would miss the loss once anything is written after the restart."""
    if cursor == "0-0":
        return False
    return not r.xrange(keys.events(cfg.run_id), min=cursor, max=cursor, count=1)


def gate_version(cfg: Config, state: RunState) -> int:
    """The version the gate counts from: the published one, or, when weights are never
    published (``weight_sync_interval = 0``), the trainer's committed steps."""
    return state.published_version if cfg.weight_sync_interval else state.steps


def run_producer(cfg: Config, r: redis.Redis) -> RunState:
    rows = load_rows(cfg)
    queue = job_queue(r, cfg)
    # docs/design.md §15.47 Processes start from the checkpoint's fold
    state, cursor = start_fold(cfg.run_dir(), r, cfg.run_id)
    pending = admission_order(cfg, len(rows))
    next_row: tuple[int, int] | None = next(pending, None)
    announced = False
    last_maintenance = 0.0
    redispatched: dict[str, int] = {}
    watch = JobWatch(cfg.job_timeout)
    gate_closed_since: float | None = None
    # docs/design.md §15.48 A memory guard before Redis refuses writes
    guard = AdmissionGuard(cfg.retention.memory_high_water)
    memory_full = guard.closed(r)
    log.info("producer: %d rows x %d epochs, G=%d, B=%d, O=%d", len(rows), cfg.epochs,
             cfg.completions_per_prompt, cfg.batch_size, cfg.offpolicy_versions)
    while True:
        # Block on the events stream only when the gate is closed: new events reopen it.
        entries, cursor = bus.read_events(r, cfg.run_id, cursor, block_ms=500)
        for _, msg in entries:
            state.apply(msg)
        if state.finished is not None:
            log.info("producer: run finished (%s)", state.finished.reason)
            return state
        while next_row is not None and not memory_full and (next_row in state.rows_admitted or can_admit(
            cfg.completions_per_prompt, published_version=gate_version(cfg, state),
            offpolicy_versions=cfg.offpolicy_versions, batch_size=cfg.batch_size,
            accepted_plus_reserved=state.reserved_samples,
            max_in_flight=cfg.max_concurrency_rollout_sample, in_flight=state.in_flight_samples,
        )):
            epoch, row_index = next_row
            if next_row not in state.rows_admitted:  # a restarted producer skips admitted rows
                state.apply(admit(r, queue, cfg, epoch, row_index, rows[row_index], state.published_version))
            next_row = next(pending, None)
        gate_closed_since = count_gate_wait(r, cfg, state, gate_closed_since, rows_left=next_row is not None)
        if next_row is None and not announced and state.exhausted_groups is None:
            bus.xadd(r, keys.events(cfg.run_id), DatasetExhausted(groups=len(state.rows_admitted)))
            log.info("producer: dataset exhausted after %d groups", len(state.rows_admitted))
            announced = True
        if time.monotonic() - last_maintenance > MAINTENANCE_EVERY_S:
            cursor = maintain(r, queue, cfg, state, cursor, rows, redispatched, watch)
            memory_full = guard.closed(r)
            if events_rolled_back(r, cfg, cursor):
                log.warning("producer: events stream lost its tail (Redis restart); rebuilding state")
                state, cursor, pending, announced = RunState(), "0-0", admission_order(cfg, len(rows)), False
                next_row = next(pending, None)
            last_maintenance = time.monotonic()


def count_gate_wait(r: redis.Redis, cfg: Config, state: RunState, closed_since: float | None, *,
                    rows_left: bool) -> float | None:
    """Add the time the staleness gate has held rows back (waiting for the trainer's next version)
    to the run's ``gate_closed_ms`` counter, the trainer's perf/sampler_wait_for_trainer_time;
    returns when the current closed spell began (None: open)."""
    now = time.monotonic()
    if closed_since is not None:
        ms = int((now - closed_since) * 1000)
        if ms:
            r.hincrby(keys.rollout_stats(cfg.run_id), keys.GATE_CLOSED_MS, ms)
        closed_since += ms / 1000  # the sub-millisecond rest carries into the next pass
    closed = rows_left and staleness_capacity(gate_version(cfg, state), cfg.offpolicy_versions, cfg.batch_size,
                                              state.reserved_samples) < cfg.completions_per_prompt
    return (now if closed_since is None else closed_since) if closed else None


def maintain(r: redis.Redis, queue: Queue, cfg: Config, state: RunState, cursor: str, rows: list[dict],
             redispatched: dict[str, int], watch: JobWatch) -> str:
    """Move every open group's job on: re-enqueue dead workers' jobs, handle spent ones,
    re-dispatch lost and stranded ones. Returns the events cursor (it folds into ``state``).
    An rq error here (its bookkeeping as a kill left it) is logged, never fatal: the next
    pass retries, and ``JobWatch`` bounds how long any group can stay stuck."""
    entries, cursor = bus.read_events(r, cfg.run_id, cursor)  # GroupSampled precedes its job's failure
    for _, msg in entries:
        state.apply(msg)
    for step in (lambda: StartedJobRegistry(queue=queue).cleanup(),  # jobs of dead workers (heartbeat expired)
                 lambda: handle_failed_jobs(r, queue, cfg, state, redispatched)):
        _guarded(step)
    lost = jobless_groups(r, cfg, state)
    overdue = stranded_groups(queue, cfg, state, watch, time.monotonic())
    if lost or overdue:  # fold first: a group sampled since the last read is neither lost nor stranded
        entries, cursor = bus.read_events(r, cfg.run_id, cursor)
        for _, msg in entries:
            state.apply(msg)
        still = {g.group_id for g in state.unsampled_groups}
        redispatch(r, queue, cfg, [g for g in lost if g.group_id in still], rows)
        _guarded(lambda: redispatch_stranded(r, queue, cfg, state, {g: why for g, why in overdue.items() if g in still},
                                             rows, redispatched))
    return cursor


def _guarded(step) -> None:
    try:
        step()
    except (redis.ConnectionError, redis.TimeoutError):
        raise  # Redis is down: the process's bounded retries and its supervisor deal with that
    except Exception:
        log.exception("producer: rq maintenance step failed; retrying on the next pass")
