"""rlstream.core.keys: key names and run-id validation."""
from __future__ import annotations

import pytest
from factories import legacy_config

from rlstream.core import keys


def test_stream_keys():
    assert keys.rollouts("run-1") == "rl:run-1:rollouts"
    assert keys.events("run-1") == "rl:run-1:events"
    assert keys.dead("run-1") == "rl:run-1:dead"
    assert keys.key_for("abc", "x") == "rl:abc:x"


def test_queue_and_heartbeat_names():
    assert keys.job_queue_name("run-1") == "rl:run-1:jobs"
    assert keys.worker_heartbeat("run-1", "host-7") == "rl:run-1:worker:host-7"
    assert keys.worker_heartbeat_pattern("run-1") == "rl:run-1:worker:*"
    assert keys.TRAINER_GROUP == "trainer"


def test_runs_do_not_share_keys():
    fns = (keys.rollouts, keys.events, keys.dead, keys.job_queue_name)
    a = {f("a") for f in fns}
    b = {f("ab") for f in fns}
    assert len(a) == len(fns) and not a & b


@pytest.mark.parametrize("run_id", ["a", "run-1", "RUN_2", "0", "x" * 64])
def test_check_run_id_accepts(run_id):
    assert keys.check_run_id(run_id) == run_id


@pytest.mark.parametrize("run_id", ["", "a:b", "r.1", "a b", " a", "a\nb", "x" * 65, "a/b", "a*", "ü", "{a}"])
def test_check_run_id_rejects(run_id):
    with pytest.raises(ValueError, match="must be 1-64 characters"):
        keys.check_run_id(run_id)


def test_check_run_id_rejects_trailing_newline():
    with pytest.raises(ValueError):
        keys.check_run_id("run1\n")


@pytest.mark.parametrize("fn", [keys.rollouts, keys.events, keys.dead, keys.job_queue_name])
def test_key_builders_validate_run_id(fn):
    with pytest.raises(ValueError):
        fn("bad:id")


@pytest.mark.parametrize("run_id", ["a", "run-1", "RUN_2", "0", "x" * 64])
def test_every_accepted_run_id_can_enqueue_jobs(run_id, r):
    from rq import Queue
    from rq.serializers import JSONSerializer

    from rlstream.producers.producer import admit

    keys.check_run_id(run_id)
    cfg = legacy_config(run_id=run_id, completions_per_prompt=2)
    queue = Queue(keys.job_queue_name(run_id), connection=r, serializer=JSONSerializer)
    admit(r, queue, cfg, 0, 0, {"prompt": "1+1="}, 0)
    assert queue.count == 1
