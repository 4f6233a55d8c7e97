"""rlstream.workers.events.EventFollower on fakeredis, the one fold of the events stream in
a worker process: RunFinished (unless a RunStarted follows it) calls on_finished once,
waiters wake on news, a dead reader is reported; and WorkerRuntime.sync_weights on it."""
from __future__ import annotations

import threading
import types

import pytest
from factories import legacy_config
from polling import wait_until

from rlstream.core import bus, keys
from rlstream.core.messages import RunFinished, RunStarted, WeightsPublished
from rlstream.core.run_state import RunState
from rlstream.workers.events import EventFollower
from rlstream.workers.runtime import WorkerRuntime, weights_to_load

RUN = "ev"
BAD = "b" * 64


def publish(r, version: int, sha256: str = "0" * 64) -> WeightsPublished:
    msg = WeightsPublished(version=version, uri=f"/weights/v{version}", sha256=sha256, bytes=0)
    bus.xadd(r, keys.events(RUN), msg)
    return msg


@pytest.fixture
def finish_calls() -> list[int]:
    return []


@pytest.fixture
def follower(r, finish_calls):
    events = EventFollower(r, RUN, on_finished=lambda: finish_calls.append(1))
    yield events
    events.stop()


def test_run_finished_calls_on_finished_once(r, follower, finish_calls):
    bus.xadd(r, keys.events(RUN), RunFinished(reason="max_steps"))
    follower.catch_up()
    assert finish_calls == [1]
    publish(r, 1)
    follower.catch_up()
    assert finish_calls == [1] and follower.state.published_version == 1


def test_a_run_started_after_run_finished_means_the_run_goes_on(r, follower, finish_calls):
    bus.xadd(r, keys.events(RUN), RunFinished(reason="max_steps"))
    bus.xadd(r, keys.events(RUN), RunStarted(run_id=RUN, config={}))
    follower.catch_up()
    assert finish_calls == [] and follower.state.finished is None


def test_the_thread_folds_news_and_wakes_waiters(r, follower, finish_calls):
    follower.start()
    writer = threading.Thread(target=publish, args=(r, 1))
    writer.start()
    got = follower.wait_for(lambda state: state.latest_weights if state.published_version >= 1 else None, 30)
    writer.join(30)
    assert got is not None and got.version == 1
    bus.xadd(r, keys.events(RUN), RunFinished(reason="done"))
    wait_until(lambda: finish_calls, 30, "on_finished")
    follower.stop()
    assert not follower._thread.is_alive()


def test_a_wait_for_what_never_comes_returns_the_falsy_value(follower):
    assert follower.wait_for(lambda state: state.latest_weights, 0.01) is None


def test_a_dead_reader_is_reported_to_waiters():
    broken = types.SimpleNamespace(xread=lambda *a, **k: 1 / 0)  # a bug, not a Redis outage
    events = EventFollower(broken, RUN, on_finished=lambda: None).start()
    wait_until(lambda: events.error is not None, 30, "the reader to record its error")
    with pytest.raises(RuntimeError, match="events reader of this worker stopped: ZeroDivisionError"):
        events.wait_for(lambda state: state.latest_weights, 30)


def test_weights_to_load():
    state, v1 = RunState(), WeightsPublished(version=1, uri="/v1", sha256=BAD, bytes=0)
    assert weights_to_load(state, 0, None) is None  # nothing published yet
    state.apply(v1)
    assert weights_to_load(state, 1, None) is v1 and weights_to_load(state, 2, None) is None
    assert weights_to_load(state, 1, v1) is None  # it would not load: wait for another event
    again = v1.model_copy(update={"sha256": "1" * 64})  # the step re-run after a crash
    state.apply(again)
    assert weights_to_load(state, 1, v1) is again


class StubPolicy:
    """Loads anything but the weights whose digest is BAD (pruned or replaced on disk)."""

    def __init__(self):
        self.version, self.tokenizer, self.loads = 0, None, []

    def load(self, published: WeightsPublished) -> None:
        self.loads.append(published.sha256)
        if published.sha256 == BAD:
            raise FileNotFoundError(published.uri)
        self.version = published.version


def test_sync_weights_waits_past_weights_that_do_not_load(r, follower):
    publish(r, 0)
    publish(r, 1, sha256=BAD)
    rt = WorkerRuntime(legacy_config(run_id=RUN), r, worker_id="w", device="cpu", rollout_fn_factory=None,
                       events=follower)
    rt.policy = StubPolicy()
    follower.start()
    syncing = threading.Thread(target=rt.sync_weights, args=(1,), daemon=True)
    syncing.start()
    wait_until(lambda: rt.policy.loads == [BAD], 30, "the failed load of v1")
    publish(r, 1)  # the same version again, now loadable
    syncing.join(30)
    assert not syncing.is_alive() and rt.policy.version == 1 and rt.policy.loads == [BAD, "0" * 64]
