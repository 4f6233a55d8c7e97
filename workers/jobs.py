"""The rq side of a worker: the job function and a worker class that keeps the policy
in process (rq's ``SimpleWorker``: no fork per job, so the model is loaded once).

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
from typing import Any

from rq import SimpleWorker
from rq.worker import WorkerStatus

from rlstream import streams
from rlstream.messages import GroupJob
from rlstream.run_state import RunState

log = logging.getLogger(__name__)
_runtime: contextvars.ContextVar = contextvars.ContextVar("rlstream_worker_runtime")
HEARTBEAT_TTL_S = 15
HEARTBEAT_EVERY_S = 3.0


def run_group(payload: dict[str, Any]) -> dict[str, Any]:
    """rq job: roll out one prompt group (``producers.producer.JOB_FUNC`` names this)."""
    runtime = _runtime.get(None)
    if runtime is None:
        raise RuntimeError("workers.jobs.run_group must run inside `rlstream worker` (RolloutWorker)")
    return runtime.run_group(GroupJob.model_validate(payload))


class RolloutWorker(SimpleWorker):
    """A SimpleWorker bound to one ``WorkerRuntime``.

    SimpleWorker runs the job in this process and refreshes no heartbeat meanwhile, so rq
    would only notice a killed worker after job_timeout + 60 s. A side thread refreshes the
    job's heartbeat every few seconds with a short TTL instead: a dead worker's job expires
    from the StartedJobRegistry within ``HEARTBEAT_TTL_S`` and the producer's cleanup
    re-enqueues it; a hung one is still stopped by rq's job timeout.
    """

    def __init__(self, *args: Any, runtime: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.runtime = runtime

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return HEARTBEAT_TTL_S

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

    def _beat(self, job, execution, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_EVERY_S):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception as exc:  # Redis restarting: the next beat retries
                log.debug("heartbeat failed: %s", exc)


def stop_on_run_finished(r, run_id: str, stop: threading.Event) -> threading.Thread:
    """Watch the events stream in a daemon thread; on ``RunFinished`` send ourselves SIGTERM,
    which rq turns into a warm shutdown (finish the current job, then exit)."""

    def watch() -> None:
        cursor, state = "0-0", RunState()
        while not stop.is_set():
            try:
                entries, cursor = streams.read_events(r, run_id, cursor, block_ms=1000)
            except Exception as exc:  # redis restarting: the client retries, we just keep watching
                log.debug("event watch: %s", exc)
                stop.wait(1.0)
                continue
            for _, msg in entries:
                state.apply(msg)
            if state.finished is not None:  # folded: a RunStarted after it means the run goes on
                log.info("run finished: stopping worker")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="run-finished-watch", daemon=True)
    thread.start()
    return thread
