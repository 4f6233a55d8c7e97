"""``rlstream worker``: one rq worker process holding the policy in memory."""
from __future__ import annotations

import logging
import threading

import redis
from rq.serializers import JSONSerializer

from producers.producer import job_queue
from rlstream.config import Config
from rlstream.torch_setup import setup_torch
from rlstream.imports import import_object
from rlstream.rewards import resolve_reward
from workers.builtin_rollout import single_turn_factory
from workers.jobs import RolloutWorker, stop_on_run_finished
from workers.runtime import WorkerRuntime

log = logging.getLogger(__name__)


def resolve_factory(cfg: Config):
    """The user's ``rollout_fn_factory`` by name, else the built-in single-turn rollout."""
    if cfg.rollout_fn_factory:
        return import_object(cfg.rollout_fn_factory, "rollout_fn_factory")
    return single_turn_factory(resolve_reward(cfg.reward_fn))


def run_worker(cfg: Config, r: redis.Redis, worker_id: str) -> None:
    factory = resolve_factory(cfg)  # before torch: a bad name fails fast
    device = setup_torch(cfg.device, cfg.torch_threads, cfg.seed)
    runtime = WorkerRuntime(cfg, r, worker_id, device, rollout_fn_factory=factory)
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
