"""``rlstream worker``: one rq worker process holding the policy in memory.

rq's work loop ends quietly (it logs and returns) on an error it does not handle, e.g. a
Redis restart that outlasts the client's retries; returning normally would look like a
clean exit and a supervisor would not restart the worker, so a return before the run
finished raises instead (exit code 1: ``rlstream up`` restarts it).
"""
from __future__ import annotations

import logging
import threading

import redis
from rq.serializers import JSONSerializer

from rlstream.core import bus
from rlstream.core.config import Config
from rlstream.core.errors import RlstreamError
from rlstream.core.jobs import job_queue
from rlstream.core.run_state import RunState
from rlstream.sampling.rollout_fn import resolve_factory
from rlstream.sampling.torch_setup import setup_torch
from rlstream.workers.jobs import RolloutWorker, stop_on_run_finished
from rlstream.workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)
# rq blocks in BLMOVE for worker_ttl - 15 s and raises the client's socket timeout to that
# + 10 s (default worker_ttl 420: a 415 s read); 25 s keeps a half-open connection's stall short.
WORKER_TTL_S = 25


class WorkerStopped(RlstreamError):
    """rq's work loop ended before the run finished."""


def check_work_ended(worker: RolloutWorker, r: redis.Redis, run_id: str, worker_id: str) -> None:
    """Raise ``WorkerStopped`` unless rq's work loop ended on request (a SIGTERM: ``up``
    stopping, or our RunFinished watch) or the run is finished."""
    if worker._shutdown_requested_date is not None:  # rq sets it on SIGTERM / SIGINT
        return
    state = RunState()
    for _, msg in bus.iter_all_events(r, run_id):
        state.apply(msg)
    if state.finished is None:
        raise WorkerStopped(f"worker {worker_id}: rq's work loop ended before the run finished (see the error above "
                            "in this log); restart the worker (`rlstream up` does so itself)")


def run_worker(cfg: Config, r: redis.Redis, worker_id: str) -> None:
    factory = resolve_factory(cfg)  # before torch: a bad name fails fast
    device = setup_torch(cfg.device, cfg.torch_threads, cfg.seed)
    runtime = WorkerRuntime(cfg, r, worker_id, device, rollout_fn_factory=factory)
    worker = RolloutWorker([job_queue(r, cfg)], connection=r, serializer=JSONSerializer,
                           name=f"rlstream-{cfg.run_id}-{worker_id}", runtime=runtime, worker_ttl=WORKER_TTL_S)
    stop = threading.Event()
    stop_on_run_finished(r, cfg.run_id, stop)
    log.info("worker %s: waiting for jobs", worker_id)
    try:
        worker.work(logging_level="WARNING")
    finally:
        stop.set()
    check_work_ended(worker, r, cfg.run_id, worker_id)
    log.info("worker %s: exiting (%d invalid samples)", worker_id, runtime.invalid_samples)
