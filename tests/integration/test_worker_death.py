"""A rollout worker SIGKILLed mid-job: the producer's registry cleanup re-enqueues its job
(same job id); once rq's retries are spent the producer re-dispatches it, and after
``MAX_REDISPATCH`` it rejects the group explicitly; a worker hung where rq's timeout cannot
reach lets its job's heartbeat lapse. Real redis-server, real rq worker processes (whose
rollout hangs, so that they die or hang mid-job)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from factories import legacy_config
from polling import wait_until
from rq import Retry
from rq.job import JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry

from rlstream.core import bus
from rlstream.core.jobs import JOB_FUNC, job_queue
from rlstream.core.messages import GroupJob, GroupRejected, RolloutJob
from rlstream.core.run_state import RunState
from rlstream.producers.producer import MAX_REDISPATCH, admit, handle_failed_jobs

pytestmark = pytest.mark.integration

WORKER = """
import signal, sys, time
from rlstream.core.connection import connect
from rlstream.core.jobs import job_queue
from rlstream.core.config import Config
from rq.serializers import JSONSerializer
from rlstream.workers.jobs import RolloutWorker

class HangingRuntime:
    def run_job(self, job, slot=None):
        if sys.argv[3] == "uninterruptible":  # as if stuck in C code: rq's SIGALRM never lands
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)

r = connect(sys.argv[1])
worker = RolloutWorker([job_queue(r, Config(run_id=sys.argv[2]))], connection=r, serializer=JSONSerializer,
                       runtime=HangingRuntime())
worker.hung_grace_s = 0.0
worker.work(burst=True)
"""


def kill_worker_mid_job(redis_url: str, run_id: str, job) -> None:
    worker = subprocess.Popen([sys.executable, "-c", WORKER, redis_url, run_id, "sleep"])
    try:
        wait_until(lambda: job.get_status(refresh=True) == JobStatus.STARTED, 30, "the job to start")
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()


def test_killed_worker_job_is_reenqueued_then_redispatched_then_rejected(r, redis_url, run_id):
    cfg = legacy_config(run_id=run_id, completions_per_prompt=2)
    queue = job_queue(r, cfg)
    state = RunState()
    state.apply(admit(r, queue, cfg, 0, 0, {"prompt": "1+1="}, 0))
    job = queue.fetch_job(f"{run_id}-e0-r0-a0")
    started, redispatched = StartedJobRegistry(queue=queue), {}
    after_heartbeat_ttl = lambda: time.time() + 60  # noqa: E731  (workers.jobs.heartbeat_ttl is <= 15 s)

    kill_worker_mid_job(redis_url, run_id, job)
    started.cleanup(timestamp=after_heartbeat_ttl())
    assert job.id in queue.job_ids, "abandoned job not re-enqueued (a retry interval would need a scheduler)"

    for _ in range(2 + MAX_REDISPATCH + 1):  # rq retries left, then our re-dispatches, then rejection
        if job.id not in queue.job_ids:
            break
        kill_worker_mid_job(redis_url, run_id, job)
        started.cleanup(timestamp=after_heartbeat_ttl())
        handle_failed_jobs(r, queue, cfg, state, redispatched, [{"prompt": "1+1="}])
    assert redispatched == {job.id: MAX_REDISPATCH}
    rejected = [m for _, m in bus.iter_all_events(r, run_id) if isinstance(m, GroupRejected)]
    assert len(rejected) == 1 and rejected[0].group_id == "e0-r0-a0" and "Abandoned" in rejected[0].reason
    assert job.id not in queue.job_ids and FailedJobRegistry(queue=queue).get_job_ids() == []


def test_hung_job_that_rq_cannot_interrupt_is_abandoned_after_its_timeout(r, redis_url, run_id):
    queue = job_queue(r, legacy_config(run_id=run_id))
    payload = RolloutJob(run_id=run_id, groups=[GroupJob(
        run_id=run_id, group_id="e0-r0-a0", row_index=0, epoch=0, attempt=0, submit_version=0, group_size=2,
        row={"prompt": "1+1="})]).model_dump(mode="json")
    job = queue.enqueue_call(JOB_FUNC, args=(payload,), job_id=f"{run_id}-hung", timeout=2, result_ttl=0,
                             retry=Retry(max=1))
    worker = subprocess.Popen([sys.executable, "-c", WORKER, redis_url, run_id, "uninterruptible"])
    started = StartedJobRegistry(queue=queue)
    try:
        wait_until(lambda: job.get_status(refresh=True) == JobStatus.STARTED, 30, "the job to start")
        assert job.id not in queue.job_ids
        # Real time, no fudged timestamp: the heartbeat lapses ~timeout + TTL after the start.
        wait_until(lambda: started.cleanup() or job.id in queue.job_ids, 20, "the hung job to be re-enqueued")
        assert worker.poll() is None, "the worker should still be stuck in the job"
    finally:
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
