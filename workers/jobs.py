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

from rlstream import streams
from rlstream.messages import GroupJob, RunFinished

log = logging.getLogger(__name__)
_runtime: contextvars.ContextVar = contextvars.ContextVar("rlstream_worker_runtime")


def run_group(payload: dict[str, Any]) -> dict[str, Any]:
    """rq job: roll out one prompt group (``producers.producer.JOB_FUNC`` names this)."""
    runtime = _runtime.get(None)
    if runtime is None:
        raise RuntimeError("workers.jobs.run_group must run inside `rlstream worker` (RolloutWorker)")
    return runtime.run_group(GroupJob.model_validate(payload))


class RolloutWorker(SimpleWorker):
    """A SimpleWorker bound to one ``WorkerRuntime``."""

    def __init__(self, *args: Any, runtime: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.runtime = runtime

    def execute_job(self, job, queue):
        token = _runtime.set(self.runtime)
        try:
            return super().execute_job(job, queue)
        finally:
            _runtime.reset(token)


def stop_on_run_finished(r, run_id: str, stop: threading.Event) -> threading.Thread:
    """Watch the events stream in a daemon thread; on ``RunFinished`` send ourselves SIGTERM,
    which rq turns into a warm shutdown (finish the current job, then exit)."""

    def watch() -> None:
        cursor = "0-0"
        while not stop.is_set():
            try:
                entries, cursor = streams.read_events(r, run_id, cursor, block_ms=1000)
            except Exception as exc:  # redis restarting: the client retries, we just keep watching
                log.debug("event watch: %s", exc)
                stop.wait(1.0)
                continue
            if any(isinstance(m, RunFinished) for _, m in entries):
                log.info("run finished: stopping worker")
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="run-finished-watch", daemon=True)
    thread.start()
    return thread
