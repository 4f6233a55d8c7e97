"""``rlstream worker``: one rq worker process holding the policy in memory."""
from __future__ import annotations

import logging
import threading

import redis
from rq.serializers import JSONSerializer

from producers.producer import job_queue
from rlstream.config import Config
from rlstream.torch_setup import setup_torch
from workers.builtin_rollout import make_rollout_fn
from workers.jobs import RolloutWorker, stop_on_run_finished
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def run_worker(cfg: Config, r: redis.Redis, worker_id: str) -> None:
    device = setup_torch(cfg.device, cfg.torch_threads, cfg.seed)
    runtime = WorkerRuntime(cfg, r, worker_id, device, rollout_fn_factory=make_rollout_fn)
    worker = RolloutWorker([job_queue(r, cfg)], connection=r, serializer=JSONSerializer,
                           name=f"rlstream-{cfg.run_id}-{worker_id}", runtime=runtime)
    stop = threading.Event()
    stop_on_run_finished(r, cfg.run_id, stop)
    log.info("worker %s: waiting for jobs", worker_id)
    try:
        worker.work(logging_level="WARNING")
    finally:
        stop.set()
    log.info("worker %s: exiting (%d invalid samples)", worker_id, runtime.invalid_samples)
