"""``rlstream worker``: one rq worker process holding the policy in memory."""
from __future__ import annotations

import logging

import redis
from rq.serializers import JSONSerializer

from rlstream.core.config import Config
from rlstream.core.errors import RlstreamError
from rlstream.core.jobs import job_queue
from rlstream.sampling.rollout_fn import resolve_factory
from rlstream.sampling.torch_setup import setup_torch
from rlstream.workers.events import EventFollower
from rlstream.workers.jobs import RolloutWorker, warm_shutdown
from rlstream.workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def run_worker(cfg: Config, r: redis.Redis, worker_id: str) -> None:
    factory = resolve_factory(cfg)  # before torch: a bad name fails fast
    device = setup_torch(cfg.workers_device, cfg.torch_threads, cfg.seed)
    events = EventFollower(r, cfg.run_id, on_finished=warm_shutdown)  # the process's one read of the events
    runtime = WorkerRuntime(cfg, r, worker_id, device, rollout_fn_factory=factory, events=events)
    worker = RolloutWorker([job_queue(r, cfg)], connection=r, serializer=JSONSerializer,
                           name=f"rlstream-{cfg.run_id}-{worker_id}", runtime=runtime)
    events.start()
    log.info("worker %s: waiting for jobs", worker_id)
    try:
        worker.work(logging_level="WARNING")
    finally:
        events.stop()
    if events.error is not None:
        raise RlstreamError(f"worker {worker_id}: its events reader failed ({events.error!r}); restart the worker")
    log.info("worker %s: exiting (%d invalid samples, %d rollout failures)", worker_id,
             runtime.totals["invalid_samples"], runtime.totals["rollout_failures"])
