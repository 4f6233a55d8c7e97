"""The rq queue of prompt-group jobs, which the producer fills and the workers drain: its
name, serializer (JSON, never pickle) and default timeout, and the job function both sides
name. A group's job id comes from ``keys.job_id``."""
from __future__ import annotations

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from rlstream.core import keys
from rlstream.core.config import Config

# rq imports the job function by this name inside the worker process.
JOB_FUNC = "rlstream.workers.jobs.run_group"


def job_queue(r: redis.Redis, cfg: Config) -> Queue:
    return Queue(keys.job_queue_name(cfg.run_id), connection=r, serializer=JSONSerializer,
                 default_timeout=cfg.job_timeout)
