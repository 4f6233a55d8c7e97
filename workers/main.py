"""``rlstream worker``: one rq worker process holding the policy in memory.

rq's work loop ends quietly (it logs and returns) on an error it does not handle, e.g. a
Redis restart that outlasts the client's retries; returning normally would look like a
clean exit and a supervisor would not restart the worker, so a return before the run
finished raises instead (exit code 1: ``rlstream up`` restarts it).
"""
from __future__ import annotations

import logging

import redis
from rq.serializers import JSONSerializer

from rlstream.core import keys
from rlstream.core.config import Config
from rlstream.core.errors import RlstreamError
from rlstream.core.fold_snapshot import start_fold
from rlstream.core.jobs import job_queue
from rlstream.sampling.rollout_fn import resolve_factory
from rlstream.sampling.torch_setup import setup_torch
from rlstream.workers.events import EventFollower
from rlstream.workers.jobs import RolloutWorker, warm_shutdown
from rlstream.workers.runtime import WorkerRuntime
from rlstream.workers.slots import holds_several, worker_slots

log = logging.getLogger(__name__)
# rq blocks in BLMOVE for worker_ttl - 15 s and raises the client's socket timeout to that
# + 10 s (default worker_ttl 420: a 415 s read); 25 s keeps a half-open connection's stall short.
WORKER_TTL_S = 25


class WorkerStopped(RlstreamError):
    """rq's work loop ended before the run finished."""


def check_work_ended(worker: RolloutWorker, events: EventFollower, worker_id: str) -> None:
    """Raise ``WorkerStopped`` unless rq's work loop ended on request (a SIGTERM: ``up``
    stopping, or the RunFinished watch) or the run is finished."""
    if worker._shutdown_requested_date is not None:  # rq sets it on SIGTERM / SIGINT
        return
    try:
        events.catch_up()  # the follower has stopped: one last read of its own
    except redis.RedisError:
        pass  # judged on what was folded
    if events.state.finished is None:
        raise WorkerStopped(f"worker {worker_id}: rq's work loop ended before the run finished (see the error above "
                            "in this log); restart the worker (`rlstream up` does so itself)")


def run_worker(cfg: Config, r: redis.Redis, worker_id: str) -> None:
    factory = resolve_factory(cfg)  # before torch: a bad name fails fast
    device = setup_torch(cfg.workers_device, cfg.torch_threads, cfg.seed)
    events = EventFollower(r, cfg.run_id, on_finished=warm_shutdown,  # the process's one read of the events
                           start=start_fold(cfg.run_dir(), r, cfg.run_id))
    runtime = WorkerRuntime(cfg, r, worker_id, device, rollout_fn_factory=factory, events=events,
                            concurrent=holds_several(cfg))
    slots = worker_slots(cfg, runtime.controller)
    runtime.slots = slots
    worker = RolloutWorker([job_queue(r, cfg)], connection=r, serializer=JSONSerializer,
                           name=f"rlstream-{cfg.run_id}-{worker_id}", runtime=runtime, worker_ttl=WORKER_TTL_S,
                           slots=slots, drain_s=cfg.job_timeout + 15.0)
    if not cfg.inference.remote:  # while the trainer starts, not after its first weights are out
        from rlstream.sampling.local import preload_model_code

        preload_model_code(cfg.base_model)
    events.start()
    log.info("worker %s: waiting for jobs (%s)", worker_id, "one group at a time" if slots is None else
             f"groups while fewer than {slots.window()} draws are unfinished, at most {slots.max_jobs} held")
    try:
        worker.work(logging_level="WARNING")
    finally:
        events.stop()
        runtime.close()
    if events.error is not None:
        raise RlstreamError(f"worker {worker_id}: its events reader failed ({events.error!r}); restart the worker")
    if runtime.sampling is not None and runtime.sampling.stuck:
        raise RlstreamError(f"worker {worker_id}: its sampling loop got stuck (see the error above); restart the "
                            "worker (`rlstream up` does so itself) and make the rollout_fn's blocking calls async")
    check_work_ended(worker, events, worker_id)
    log.info("worker %s: exiting (%d invalid samples, %d rollout failures)", worker_id,
             runtime.totals[keys.INVALID_SAMPLES], runtime.totals[keys.ROLLOUT_FAILURES])
