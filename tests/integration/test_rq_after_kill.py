"""rq 3.0 bookkeeping a killed worker leaves behind must never crash a process or strand a
group (issue "Reliability II" item 2). A killed worker's execution hash expires with its
heartbeat, but the job's ExecutionRegistry keeps the entry 60 s longer; rq's ``Job.delete``
then raised ``ValueError: Execution <id> not found in Redis`` from the worker's success
handling (``result_ttl=0``) and from the producer's failed-job removal. Real redis-server."""
from __future__ import annotations

import types

import pytest
from factories import legacy_config
from rq.executions import Execution, ExecutionRegistry
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from rlstream.core import bus
from rlstream.core.config import Config
from rlstream.core.jobs import delete_job, job_places, job_queue, prune_dead_executions
from rlstream.core.messages import GroupRejected, GroupSampled
from rlstream.core.run_state import RunState
from rlstream.producers.producer import MAX_REDISPATCH, admit, handle_failed_jobs, redispatch_stranded, stranded_jobs
from rlstream.producers.stranded import STRANDED_GRACE_S, JobWatch
from rlstream.workers.jobs import RolloutWorker

pytestmark = pytest.mark.integration


def dead_execution(r, job: Job) -> Execution:
    """What a SIGKILLed worker leaves: an execution whose hash expired, still registered."""
    with r.pipeline() as pipe:
        execution = Execution.create(job, ttl=60, pipeline=pipe, worker_name="killed")
        pipe.execute()
    r.delete(execution.key)
    return execution


def admitted(r, run_id: str) -> tuple[Config, object, RunState, Job]:
    cfg = legacy_config(run_id=run_id, completions_per_prompt=2)
    queue, state = job_queue(r, cfg), RunState()
    state.apply(admit(r, queue, cfg, 0, 0, {"prompt": "1+1="}, 0))
    return cfg, queue, state, queue.fetch_job(f"{run_id}-e0-r0-a0")



def recording_runtime(runs: list[str]) -> types.SimpleNamespace:
    """A worker runtime whose ``run_job`` only records the groups it was given (``slot``: its run's
    token in the worker's JobSlots, unused here)."""
    return types.SimpleNamespace(run_job=lambda job, slot=None: runs.extend(g.group_id for g in job.groups)
                                 or {"ok": True})

def test_a_dead_execution_made_rq_job_delete_raise(r, run_id):
    """The rq behaviour the fixes work around (if rq fixes it, this test says so)."""
    _, _, _, job = admitted(r, run_id)
    dead_execution(r, job)
    with pytest.raises(ValueError, match="not found in Redis"):
        job.delete()


def test_prune_keeps_live_executions(r, run_id):
    _, _, _, job = admitted(r, run_id)
    dead = dead_execution(r, job)
    with r.pipeline() as pipe:
        live = Execution.create(job, ttl=60, pipeline=pipe, worker_name="alive")
        pipe.execute()
    assert prune_dead_executions(r, job.id) == 1
    ids = ExecutionRegistry(job.id, connection=r).get_execution_ids()
    assert ids == [live.id] and dead.id not in ids


def test_producer_removes_a_failed_job_with_a_dead_execution(r, run_id):
    cfg, queue, state, job = admitted(r, run_id)
    dead_execution(r, job)
    queue.remove(job.id)
    job.set_status(JobStatus.FAILED)
    FailedJobRegistry(queue=queue).add(job, ttl=600)
    handle_failed_jobs(r, queue, cfg, state, {}, [{"prompt": "1+1="}])  # raised ValueError before the fix
    rejected = [m for _, m in bus.iter_all_events(r, run_id) if isinstance(m, GroupRejected)]
    assert [m.group_id for m in rejected] == ["e0-r0-a0"]
    assert not r.exists(job.key) and FailedJobRegistry(queue=queue).get_job_ids() == []


def test_producer_does_not_reject_a_sampled_group_whose_job_failed_afterwards(r, run_id):
    """The samples are in the rollouts stream (written in the MULTI of GroupSampled): the
    group is the trainer's business; the spent job is only removed."""
    cfg, queue, state, job = admitted(r, run_id)
    state.apply(GroupSampled(group_id="e0-r0-a0", samples=2))
    queue.remove(job.id)
    job.set_status(JobStatus.FAILED)
    FailedJobRegistry(queue=queue).add(job, ttl=600)
    handle_failed_jobs(r, queue, cfg, state, {}, [{"prompt": "1+1="}])
    assert not [m for _, m in bus.iter_all_events(r, run_id) if isinstance(m, GroupRejected)]
    assert not r.exists(job.key) and FailedJobRegistry(queue=queue).get_job_ids() == []


def test_worker_success_with_a_dead_execution_deletes_the_job(r, run_id):
    """A job re-run after its first worker was killed: it succeeds, and rq deletes it
    (result_ttl=0) instead of failing it on the dead execution and running it again."""
    cfg, queue, _, job = admitted(r, run_id)
    dead_execution(r, job)
    runs = []
    runtime = recording_runtime(runs)
    worker = RolloutWorker([queue], connection=r, serializer=JSONSerializer, runtime=runtime)
    worker.work(burst=True, logging_level="WARNING")
    assert runs == ["e0-r0-a0"]
    assert FailedJobRegistry(queue=queue).get_job_ids() == []
    assert not r.exists(job.key), "the succeeded job should be deleted (result_ttl=0)"
    assert job.id not in queue.job_ids


def test_delete_job_clears_every_place(r, run_id):
    _, queue, _, job = admitted(r, run_id)
    dead_execution(r, job)
    r.rpush(queue.intermediate_queue_key, job.id)
    delete_job(queue, job.id)
    place = job_places(queue, [job.id])[job.id]
    assert not (place.exists or place.queued or place.dequeued or place.started or place.failed)
    assert not r.exists(ExecutionRegistry(job.id, connection=r).key)
    delete_job(queue, job.id)  # a job that is already gone: nothing to do, no error


def stranded_passes(r, cfg, queue, state, watch, rows, redispatched, t0: float) -> dict[str, str]:
    """Two maintenance passes STRANDED_GRACE_S apart (explicit clock, no sleeping)."""
    assert stranded_jobs(queue, cfg, state, watch, t0) == {}  # first sight starts the clock
    overdue = stranded_jobs(queue, cfg, state, watch, t0 + STRANDED_GRACE_S)
    redispatch_stranded(r, queue, cfg, state, overdue, rows, redispatched)
    return overdue


@pytest.mark.parametrize("strand", ["worker killed after taking the job", "producer killed inside requeue"])
def test_stranded_job_is_redispatched_then_rejected_with_a_reason(r, run_id, strand):
    cfg, queue, state, job = admitted(r, run_id)
    rows, redispatched, watch = [{"prompt": "1+1="}], {}, JobWatch(cfg.job_timeout)
    for attempt in range(MAX_REDISPATCH + 1):
        if strand == "worker killed after taking the job":  # BLMOVE done, execution never created
            r.lmove(queue.key, queue.intermediate_queue_key)
        else:  # FailedJobRegistry.requeue's ZREM done, its enqueue not
            queue.remove(job.id)
            job.set_status(JobStatus.FAILED)
        overdue = stranded_passes(r, cfg, queue, state, watch, rows, redispatched, 1000.0 * attempt)
        assert list(overdue) == [job.id], overdue
        if attempt < MAX_REDISPATCH:
            assert queue.job_ids == [job.id], "a stranded job must be back in the queue"
            assert job_places(queue, [job.id])[job.id].status == "queued"
    rejected = [m for _, m in bus.iter_all_events(r, run_id) if isinstance(m, GroupRejected)]
    assert [m.group_id for m in rejected] == ["e0-r0-a0"] and "stranded" in rejected[0].reason
    assert queue.job_ids == [] and not r.exists(job.key)


def test_queued_started_and_failed_jobs_are_not_stranded(r, run_id):
    cfg, queue, state, job = admitted(r, run_id)
    watch = JobWatch(cfg.job_timeout)
    assert stranded_jobs(queue, cfg, state, watch, 0.0) == {}
    assert stranded_jobs(queue, cfg, state, watch, 10_000.0) == {}  # queued: waits for a worker, however long
    queue.remove(job.id)
    FailedJobRegistry(queue=queue).add(job, ttl=600)
    assert stranded_jobs(queue, cfg, state, watch, 20_000.0) == {}  # failed: handle_failed_jobs' business
    assert stranded_jobs(queue, cfg, state, watch, 30_000.0) == {}


def test_worker_success_whose_reply_was_lost_is_not_failed(r, run_id, monkeypatch):
    """A cut connection after Redis ran rq's success MULTI: rq runs it again (it watches the
    job's dependents) and finds the job deleted; a late heartbeat whose reply was lost too has
    re-created the job hash with only ``last_heartbeat``. The job succeeded: it must not be
    failed (and run again), and the stray hash must go (tests/e2e/test_network_faults.py)."""
    rq_class = next(c for c in RolloutWorker.__mro__[1:] if "handle_job_success" in vars(c))
    cfg, queue, _, job = admitted(r, run_id)
    original = rq_class.handle_job_success
    attempts = []

    def lost_reply(self, job, queue, started_job_registry, execution):
        original(self, job, queue, started_job_registry, execution)  # Redis ran it; the reply is lost
        r.hset(job.key, "last_heartbeat", "2026-12-07T10:00:00Z")  # a heartbeat's retry re-created the hash
        attempts.append(job.id)
        original(self, job, queue, started_job_registry, execution)  # the retry: rq raises InvalidJobOperation

    monkeypatch.setattr(rq_class, "handle_job_success", lost_reply)
    runs = []
    runtime = recording_runtime(runs)
    worker = RolloutWorker([queue], connection=r, serializer=JSONSerializer, runtime=runtime)
    worker.work(burst=True, logging_level="WARNING")
    assert runs == ["e0-r0-a0"] and attempts[-1] == job.id
    assert FailedJobRegistry(queue=queue).get_job_ids() == []
    assert not r.exists(job.key), "the succeeded job's hash (or a stray heartbeat's) should be gone"
