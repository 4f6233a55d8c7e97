"""The producer: admits prompt groups under the gate and enqueues them as rq jobs of up to
``Config.groups_per_job`` groups each (docs/design.md §15.75 Several groups per rq job).

State is a fold over the events stream, so a restarted producer skips rows that were
already admitted. Admission is job-atomic: the rq job and its groups' ``GroupAdmitted``
events are written in one MULTI. Jobs use rq's JSON serializer, never pickle. Everything
that moves a job on after a kill (re-dispatch, rejection) works per job, on the groups of
it that are still open and unsampled.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Iterator, Mapping, Sequence

import redis
from rq import Queue, Retry
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job
from rq.registry import FailedJobRegistry, StartedJobRegistry

from rlstream.core import bus, keys
from rlstream.core.config import Config
from rlstream.core.fold_snapshot import start_fold
from rlstream.core.jobs import JOB_FUNC, JOB_RETRIES, carried, delete_job, job_of, job_places, job_queue, jobs_of
from rlstream.core.memory_guard import AdmissionGuard
from rlstream.core.messages import DatasetExhausted, GroupAdmitted, GroupJob, GroupRejected, RolloutJob, group_id_for
from rlstream.core.run_state import RunState
from rlstream.producers.datasets import epoch_order, load_rows
from rlstream.producers.gate import can_admit, staleness_capacity
from rlstream.producers.stranded import JobWatch

log = logging.getLogger(__name__)
MAINTENANCE_EVERY_S = 2.0
MAX_REDISPATCH = 3
Rows = Sequence[dict[str, Any]] | Mapping[int, dict[str, Any]]  # the dataset's rows by row index


def admission_order(cfg: Config, n_rows: int) -> Iterator[tuple[int, int]]:
    """(epoch, row_index) in admission order."""
    for epoch in range(cfg.epochs):
        for row_index in epoch_order(n_rows, epoch, cfg.seed, cfg.shuffle):
            yield epoch, row_index


def job_data(cfg: Config, job_id: str, groups: list[GroupAdmitted], rows: Rows) -> Any:
    """The rq job carrying admitted ``groups`` (JSON, never pickle). Its id is fixed at
    admission (``GroupAdmitted.job_id``), so a re-dispatch is the same job and its samples
    deduplicate by sample_id."""
    job = RolloutJob(run_id=cfg.run_id, job_id=job_id, groups=[GroupJob(
        run_id=cfg.run_id, group_id=g.group_id, row_index=g.row_index, epoch=g.epoch, attempt=g.attempt,
        submit_version=g.submit_version, group_size=g.group_size, row=rows[g.row_index]) for g in groups])
    return Queue.prepare_data(JOB_FUNC, args=(job.model_dump(mode="json"),), job_id=job_id,
                              timeout=cfg.job_timeout, result_ttl=0, failure_ttl=7 * 86400,
                              retry=Retry(max=JOB_RETRIES))


def pick_rows(cfg: Config, state: RunState, next_row: tuple[int, int] | None,
              pending: Iterator[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """(the rows the gate lets in now, up to ``cfg.groups_per_job`` of them: one job; the next
    row in admission order). Rows already admitted (a restarted producer's) are skipped; a job
    is never held back to fill it: what the gate allows goes out at once."""
    picked: list[tuple[int, int]] = []
    G = cfg.completions_per_prompt
    while next_row is not None and len(picked) < cfg.groups_per_job and (next_row in state.rows_admitted or can_admit(
        G, published_version=gate_version(cfg, state), offpolicy_versions=cfg.offpolicy_versions,
        batch_size=cfg.batch_size, accepted_plus_reserved=state.reserved_samples + len(picked) * G,
        max_in_flight=cfg.max_concurrency_rollout_sample, in_flight=state.in_flight_samples + len(picked) * G,
    )):
        if next_row not in state.rows_admitted:
            picked.append(next_row)
        next_row = next(pending, None)
    return picked, next_row


def admit_job(r: redis.Redis, queue: Queue, cfg: Config, picked: list[tuple[int, int]], rows: Rows,
              version: int) -> list[GroupAdmitted]:
    """Admit the groups of ``picked`` rows ((epoch, row index), at least one) as one rq job,
    in one MULTI with their ``GroupAdmitted`` events."""
    job_id = keys.job_id(cfg.run_id, group_id_for(*picked[0], 0))
    events = [GroupAdmitted(group_id=group_id_for(epoch, row_index, 0), row_index=row_index, epoch=epoch, attempt=0,
                            submit_version=version, group_size=cfg.completions_per_prompt, job_id=job_id)
              for epoch, row_index in picked]
    with r.pipeline(transaction=True) as pipe:
        queue.enqueue_many([job_data(cfg, job_id, events, rows)], pipeline=pipe)
        for event in events:
            bus.xadd(pipe, keys.events(cfg.run_id), event)
        pipe.execute()
    return events


def admit(r: redis.Redis, queue: Queue, cfg: Config, epoch: int, row_index: int,
          row: dict[str, Any], version: int) -> GroupAdmitted:
    """Admit one row's group as a job of its own."""
    return admit_job(r, queue, cfg, [(epoch, row_index)], {row_index: row}, version)[0]


def enqueue_again(queue: Queue, cfg: Config, jobs: dict[str, list[GroupAdmitted]], rows: Rows) -> None:
    """Enqueue each job afresh, under its own id, with only the groups given (its open,
    unsampled ones)."""
    if jobs:
        queue.enqueue_many([job_data(cfg, job_id, groups, rows) for job_id, groups in jobs.items()])


def jobless_groups(r: redis.Redis, cfg: Config, state: RunState) -> list[GroupAdmitted]:
    """Open groups that no worker has written and whose rq job no longer exists. The job
    hash lives from the admission's MULTI until the job succeeds (``result_ttl=0``), and a
    job writes its groups' ``GroupSampled`` before it succeeds, so such a group was lost with
    Redis's last writes (an OS crash under ``appendfsync everysec``), by hand, or by a
    producer killed between deleting a stranded job and enqueueing it again. Call it
    *before* folding the newest events: a job that succeeded meanwhile has its GroupSampled there."""
    jobs = jobs_of(cfg.run_id, state.unsampled_groups)
    if not jobs:
        return []
    with r.pipeline(transaction=False) as pipe:
        for job_id in jobs:
            pipe.exists(Job.key_for(job_id))
        present = pipe.execute()
    return [g for groups, exists in zip(jobs.values(), present) if not exists for g in groups]


def redispatch(r: redis.Redis, queue: Queue, cfg: Config, groups: list[GroupAdmitted], rows: Rows) -> None:
    for g in groups:
        log.warning("group %s: admitted but its job and samples are gone (lost Redis writes?); re-dispatching",
                    g.group_id)
    enqueue_again(queue, cfg, jobs_of(cfg.run_id, groups), rows)


def open_members(cfg: Config, state: RunState, job_id: str) -> list[GroupAdmitted]:
    """The groups ``job_id`` carries that are still the producer's business: admitted, not
    settled, not sampled. A job records all its groups in one MULTI, so they are all open or none
    is, unless some were rejected by hand."""
    return [g for g in state.unsampled_groups if job_of(cfg.run_id, g) == job_id]


def handle_failed_jobs(r: redis.Redis, queue: Queue, cfg: Config, state: RunState,
                       redispatched: dict[str, int], rows: Rows) -> None:
    """Jobs whose rq retries are spent. One abandoned by dead workers is re-dispatched (same
    job id, so its samples deduplicate by sample_id), up to ``MAX_REDISPATCH`` times; any
    other failure rejects its open groups explicitly, freeing their gate slots. Groups whose
    samples were written (``GroupSampled``) are the trainer's business: a spent job with no
    open group is only removed. Fold the events first: a job fails only after its
    GroupSampled events were written."""
    registry = FailedJobRegistry(queue=queue)
    for job_id in registry.get_job_ids(cleanup=False):
        try:
            _handle_failed_job(r, queue, cfg, state, redispatched, registry, job_id, rows)
        except (ValueError, NoSuchJobError, InvalidJobOperation) as exc:
            # rq's bookkeeping after a kill (e.g. a job hash or execution gone): never crash
            # on it. The job is deleted; its groups, still open, are then re-dispatched as jobless.
            log.warning("failed job %s: rq could not handle it (%s); deleting it", job_id, exc)
            delete_job(queue, job_id)


def _handle_failed_job(r: redis.Redis, queue: Queue, cfg: Config, state: RunState, redispatched: dict[str, int],
                       registry: FailedJobRegistry, job_id: str, rows: Rows) -> None:
    groups = open_members(cfg, state, job_id)
    job = queue.fetch_job(job_id)
    result = job.latest_result() if job is not None else None
    error = (result.exc_string or "").strip().splitlines()[-1][:300] if result and result.exc_string else ""
    if not groups:
        delete_job(queue, job_id)
    elif job is None:
        registry.remove(job_id)  # hash gone: its groups are jobless and are re-dispatched as such
    elif "Abandoned" in error and redispatched.get(job_id, 0) < MAX_REDISPATCH:
        redispatched[job_id] = redispatched.get(job_id, 0) + 1
        log.warning("job %s (%d group(s)): abandoned by a dead worker; re-dispatching (%d)", job_id, len(groups),
                    redispatched[job_id])
        if [g.get("group_id") for g in carried(job)] == [g.group_id for g in groups]:
            registry.requeue(job_id)
        else:  # some of its groups were settled meanwhile (rejected by hand): re-run only the open ones
            delete_job(queue, job_id)  # killed here: its groups are jobless, re-dispatched as such
            enqueue_again(queue, cfg, {job_id: groups}, rows)
    else:
        reject(r, queue, cfg, job_id, groups, f"rollout job failed: {error}" if error else "rollout job failed")


def reject(r: redis.Redis, queue: Queue, cfg: Config, job_id: str, groups: list[GroupAdmitted], reason: str) -> None:
    """Reject a job's open groups explicitly (frees their gate slots), then delete the job:
    killed in between, a restarted producer finds no open group in it and deletes it."""
    with r.pipeline(transaction=True) as pipe:
        for g in groups:
            log.error("group %s rejected: %s", g.group_id, reason)
            bus.xadd(pipe, keys.events(cfg.run_id), GroupRejected(group_id=g.group_id, reason=reason, by="producer"))
        pipe.execute()
    delete_job(queue, job_id)


def stranded_jobs(queue: Queue, cfg: Config, state: RunState, watch: JobWatch, now: float) -> dict[str, str]:
    """{job id: reason} of the jobs of open, unsampled groups that exist but that no process
    will move on (``producers.stranded``). Call it *before* folding the newest events, and
    re-check ``unsampled_groups`` after folding (as for ``jobless_groups``)."""
    job_ids = list(jobs_of(cfg.run_id, state.unsampled_groups))
    places = job_places(queue, job_ids)
    return watch.overdue({j: places[j] for j in job_ids if places[j].exists}, now)


def redispatch_stranded(r: redis.Redis, queue: Queue, cfg: Config, state: RunState, overdue: dict[str, str],
                        rows: Rows, redispatched: dict[str, int]) -> None:
    """Delete each stranded job and enqueue it afresh (same job id, its open groups), at
    most ``MAX_REDISPATCH`` times per job; then reject its groups with the reason."""
    for job_id, why in overdue.items():
        groups = open_members(cfg, state, job_id)
        if not groups:
            continue
        if redispatched.get(job_id, 0) >= MAX_REDISPATCH:
            reject(r, queue, cfg, job_id, groups, f"{why}; re-dispatched {MAX_REDISPATCH} times already")
            continue
        redispatched[job_id] = redispatched.get(job_id, 0) + 1
        log.warning("job %s (%d group(s)): %s; re-dispatching (%d of %d)", job_id, len(groups), why,
                    redispatched[job_id], MAX_REDISPATCH)
        delete_job(queue, job_id)  # killed here: its groups are jobless, re-dispatched as such
        enqueue_again(queue, cfg, {job_id: groups}, rows)


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
    log.info("producer: %d rows x %d epochs, G=%d, B=%d, O=%d, up to %d group(s) per job", len(rows), cfg.epochs,
             cfg.completions_per_prompt, cfg.batch_size, cfg.offpolicy_versions, cfg.groups_per_job)
    while True:
        # Block on the events stream only when the gate is closed: new events reopen it.
        entries, cursor = bus.read_events(r, cfg.run_id, cursor, block_ms=500)
        for _, msg in entries:
            state.apply(msg)
        if state.finished is not None:
            log.info("producer: run finished (%s)", state.finished.reason)
            return state
        while next_row is not None and not memory_full:
            picked, next_row = pick_rows(cfg, state, next_row, pending)
            if not picked:
                break
            for event in admit_job(r, queue, cfg, picked, rows, state.published_version):
                state.apply(event)
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


def maintain(r: redis.Redis, queue: Queue, cfg: Config, state: RunState, cursor: str, rows: Rows,
             redispatched: dict[str, int], watch: JobWatch) -> str:
    """Move every open group's job on: re-enqueue dead workers' jobs, handle spent ones,
    re-dispatch lost and stranded ones. Returns the events cursor (it folds into ``state``).
    An rq error here (its bookkeeping as a kill left it) is logged, never fatal: the next
    pass retries, and ``JobWatch`` bounds how long any group can stay stuck."""
    entries, cursor = bus.read_events(r, cfg.run_id, cursor)  # GroupSampled precedes its job's failure
    for _, msg in entries:
        state.apply(msg)
    for step in (lambda: StartedJobRegistry(queue=queue).cleanup(),  # jobs of dead workers (heartbeat expired)
                 lambda: handle_failed_jobs(r, queue, cfg, state, redispatched, rows)):
        _guarded(step)
    lost = jobless_groups(r, cfg, state)
    overdue = stranded_jobs(queue, cfg, state, watch, time.monotonic())
    if lost or overdue:  # fold first: a group sampled since the last read is neither lost nor stranded
        entries, cursor = bus.read_events(r, cfg.run_id, cursor)
        for _, msg in entries:
            state.apply(msg)
        still = {g.group_id for g in state.unsampled_groups}
        redispatch(r, queue, cfg, [g for g in lost if g.group_id in still], rows)
        # a job with no open group left (sampled meanwhile) is skipped there
        _guarded(lambda: redispatch_stranded(r, queue, cfg, state, overdue, rows, redispatched))
    return cursor


def _guarded(step) -> None:
    try:
        step()
    except (redis.ConnectionError, redis.TimeoutError):
        raise  # Redis is down: the process's bounded retries and its supervisor deal with that
    except Exception:
        log.exception("producer: rq maintenance step failed; retrying on the next pass")
