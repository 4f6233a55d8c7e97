"""The rq side of a worker: the job function, a worker class that keeps the policy in
process (rq's ``SimpleWorker``: no fork per job, so the model is loaded once), and its
warm shutdown.

rq imports a job's function by name and passes only JSON arguments, so the function
finds the process's ``WorkerRuntime`` through a ContextVar that the worker binds around
each job (the one piece of per-process context; it never outlives ``execute_job``).
"""
from __future__ import annotations

import contextvars
import logging
import os
import signal
import threading
import time
from typing import Any

from rq import SimpleWorker
from rq.worker import WorkerStatus

from rlstream.core.jobs import prune_dead_executions
from rlstream.core.messages import GroupJob

log = logging.getLogger(__name__)
_runtime: contextvars.ContextVar = contextvars.ContextVar("rlstream_worker_runtime")
MAX_HEARTBEAT_TTL_S, MIN_HEARTBEAT_TTL_S = 15, 3
HUNG_GRACE_S = 10.0


def heartbeat_ttl(job_timeout: int | None) -> int:
    """Seconds a job's heartbeat outlives its worker: about half the job timeout (a dead
    worker's job is re-run well before the timeout would say so), at most 15 s, at least
    3 s (beats go every third of it, so two can be missed)."""
    if not job_timeout or job_timeout <= 0:  # rq: no timeout
        return MAX_HEARTBEAT_TTL_S
    return min(MAX_HEARTBEAT_TTL_S, max(job_timeout // 2, MIN_HEARTBEAT_TTL_S))


def still_alive(elapsed_s: float, job_timeout: int | None, grace_s: float = HUNG_GRACE_S) -> bool:
    """Whether to keep a job's heartbeat going. rq's SIGALRM normally ends a job at its
    timeout; one it cannot interrupt (rollout_fn blocked in a thread or in C code) would
    otherwise be kept alive forever by our side thread. Past timeout + grace we let the
    heartbeat lapse, and the producer's StartedJobRegistry.cleanup re-dispatches the job."""
    return not job_timeout or job_timeout <= 0 or elapsed_s <= job_timeout + grace_s


def run_group(payload: dict[str, Any]) -> dict[str, Any]:
    """rq job: roll out one prompt group (``rlstream.core.jobs.JOB_FUNC`` names this)."""
    runtime = _runtime.get(None)
    if runtime is None:
        raise RuntimeError("rlstream.workers.jobs.run_group must run inside `rlstream worker` (RolloutWorker)")
    return runtime.run_group(GroupJob.model_validate(payload))


class RolloutWorker(SimpleWorker):
    """A SimpleWorker bound to one ``WorkerRuntime``.

    SimpleWorker runs the job in this process and refreshes no heartbeat meanwhile, so rq
    would only notice a killed worker after job_timeout + 60 s. A side thread refreshes the
    job's heartbeat every few seconds with a short TTL instead (``heartbeat_ttl``): a dead
    worker's job expires from the StartedJobRegistry within that TTL and the producer's
    cleanup re-enqueues it. A hung one is stopped by rq's job timeout, or, if that cannot
    interrupt it, abandoned once it runs ``hung_grace_s`` past the timeout (``still_alive``).
    """

    hung_grace_s = HUNG_GRACE_S

    def __init__(self, *args: Any, runtime: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.runtime = runtime

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return heartbeat_ttl(job.timeout)

    def execute_job(self, job, queue):
        token = _runtime.set(self.runtime)
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="job-heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
            _runtime.reset(token)
        self.set_state(WorkerStatus.IDLE)

    def handle_job_success(self, job, queue, started_job_registry, execution):
        """rq's success handling deletes the job (``result_ttl=0``), which raises on the dead
        executions a killed worker left in the job's registry (``core.jobs``); rq would then
        count the job as failed and re-run it. Prune them first; once more if one died
        meanwhile (nothing was written: rq raises before its MULTI executes)."""
        for attempt in range(2):
            prune_dead_executions(self.connection, job.id)
            try:
                return super().handle_job_success(job, queue, started_job_registry, execution)
            except ValueError:
                if attempt:
                    raise

    def _beat(self, job, execution, stop: threading.Event) -> None:
        started = time.monotonic()
        while not stop.wait(heartbeat_ttl(job.timeout) / 3):
            if not still_alive(time.monotonic() - started, job.timeout, self.hung_grace_s):
                log.error("job %s still running %.0fs past its %ss timeout, which could not interrupt it: letting its "
                          "heartbeat lapse so that the producer re-dispatches it; restart this worker (%s)",
                          job.id, time.monotonic() - started - job.timeout, job.timeout, self.name)
                return
            try:
                self.maintain_heartbeats(job, execution)
            except Exception as exc:  # Redis restarting: the next beat retries
                log.debug("heartbeat failed: %s", exc)


def warm_shutdown() -> None:
    """SIGTERM to this process, which rq turns into a warm shutdown (finish the current job,
    then exit): what a worker does when the run finishes."""
    os.kill(os.getpid(), signal.SIGTERM)
