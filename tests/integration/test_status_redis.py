"""``rlstream status`` reads worker heartbeats and rollout error counters from Redis."""
from __future__ import annotations

from factories import legacy_config

from rlstream.core import keys
from rlstream.ops.status import collect_status


def test_status_shows_worker_versions_and_rollout_errors(r, run_id):
    r.set(keys.worker_heartbeat(run_id, "host-1"), 7, ex=60)
    r.set(keys.worker_heartbeat(run_id, "host-2"), 6, ex=60)
    r.set(keys.worker_heartbeat("other-run", "host-3"), 1, ex=60)
    r.hincrby(keys.rollout_stats(run_id), "invalid_samples", 3)
    r.hincrby(keys.rollout_stats(run_id), "rollout_failures", 1)
    status = collect_status(legacy_config(run_id=run_id), r)
    assert status["worker_versions"] == {"host-1": 7, "host-2": 6}
    assert status["rollout_errors"] == {"invalid_samples": 3, "rollout_failures": 1}
    assert status["steps"] == 0 and status["state"] == "running"
