"""rq's work loop returns quietly on an error it does not handle (e.g. Redis gone past the
client's retries): the worker process must then exit non-zero, so that ``rlstream up``
restarts it, instead of exiting 0 as if the run were over (fakeredis)."""
from __future__ import annotations

import types
from datetime import datetime, timedelta, timezone

import fakeredis
import pytest
from polling import wait_until

from rlstream.core import bus, keys
from rlstream.core.messages import RunFinished
from rlstream.workers.events import EventFollower
from rlstream.workers.main import WORKER_TTL_S, WorkerStopped, check_work_ended


def follower(r, run_id: str) -> EventFollower:
    return EventFollower(r, run_id, on_finished=lambda: None)  # never started: check_work_ended reads once


def test_a_loop_that_ended_on_its_own_before_the_run_finished_is_an_error():
    r = fakeredis.FakeRedis()
    worker = types.SimpleNamespace(_shutdown_requested_date=None)
    with pytest.raises(WorkerStopped, match="restart the worker"):
        check_work_ended(worker, follower(r, "w1"), "w")
    bus.xadd(r, keys.events("w1"), RunFinished(reason="max_steps"))
    check_work_ended(worker, follower(r, "w1"), "w")  # the run is over: a normal exit


def test_a_requested_stop_is_a_normal_exit():
    worker = types.SimpleNamespace(_shutdown_requested_date=datetime.now(timezone.utc))
    check_work_ended(worker, follower(fakeredis.FakeRedis(), "w2"), "w")


def test_rq_bounds_the_dequeue_read_below_the_default():
    """rq sets the client's socket timeout to worker_ttl - 5 s (its BLMOVE block + 10 s)."""
    from rq import SimpleWorker

    w = SimpleWorker(["q"], connection=fakeredis.FakeRedis(), worker_ttl=WORKER_TTL_S)
    assert w.connection_timeout == WORKER_TTL_S - 5 <= 30


def test_a_sigterm_as_the_last_group_finishes_stops_the_idle_wait(monkeypatch):
    """A SIGTERM that arrives as the worker sees its last group finish finds it still BUSY, so rq
    only sets its stop flag (no StopRequested raised); the loop must not then start rq's blocking
    wait for a job, which would ignore the request until its timeout (seen under load)."""
    from rq import Queue
    from rq.worker import WorkerStatus

    from rlstream.workers.jobs import RolloutWorker
    from rlstream.workers.slots import JobSlots

    class SignalOnLook(JobSlots):
        @property
        def busy(self) -> bool:  # the signal lands right after the worker looked
            if worker.get_state() == WorkerStatus.BUSY and not worker._stop_requested:
                worker._shutdown_requested_date = datetime.now(timezone.utc)  # rq's SIGTERM handler, without
                worker._shutdown()  # installing its signal handlers in the test process
            return False

    waits = []
    monkeypatch.setattr(Queue, "dequeue_any", classmethod(lambda cls, *args, **kwargs: waits.append(args)))
    r = fakeredis.FakeRedis()
    worker = RolloutWorker([Queue("q", connection=r)], connection=r, runtime=None, slots=SignalOnLook(lambda: 4))
    worker.set_state(WorkerStatus.BUSY)  # as the last group's rq bookkeeping left it
    assert worker.dequeue_job_and_maintain_ttl(20) is None
    assert worker._stop_requested
    assert waits == [], "the worker went back to waiting for a job after its stop was requested"


def test_rqs_command_channel_lets_a_warm_shutdown_end_promptly():
    """rq's teardown unsubscribes and stops the command-channel thread, and redis-py's stop()
    waits for that thread with no bound: it must wake often enough for a shutdown to end in
    seconds (it slept 60 s at a time, and workers took a minute to exit)."""
    import threading

    from rq import Queue

    from rlstream.workers.jobs import RolloutWorker

    r = fakeredis.FakeRedis()
    worker = RolloutWorker([Queue("q", connection=r)], connection=r, runtime=None)
    worker.subscribe()
    wait_until(lambda: worker.pubsub.subscribed, 10, "subscribed")
    worker.pubsub.unsubscribe()  # what rq's teardown does first; the thread then sleeps unsubscribed
    wait_until(lambda: not worker.pubsub.subscribed, 10, "the thread saw the unsubscribe")
    ending = threading.Thread(target=worker.unsubscribe, daemon=True)
    ending.start()
    ending.join(10)
    assert not ending.is_alive(), "unsubscribing (rq's teardown) did not end within 10 s"


def test_a_second_stop_after_the_run_finished_keeps_the_warm_shutdown():
    """The run's end stops a worker (its own SIGTERM) and `rlstream up` stops it a moment later:
    rq would take that second signal as a cold shutdown, leaving the sampler's connections
    unclosed (seen as aiohttp's "Unclosed client session" in the suite). Before the run's end a
    second signal is the operator's and stops the worker cold, as rq does."""
    import signal

    from rq import Queue

    from rlstream.workers.jobs import RolloutWorker

    r = fakeredis.FakeRedis()
    state = types.SimpleNamespace(finished=None)
    runtime = types.SimpleNamespace(events=types.SimpleNamespace(state=state))
    worker = RolloutWorker([Queue("q", connection=r)], connection=r, runtime=runtime)
    worker._shutdown_requested_date = datetime.now(timezone.utc) - timedelta(seconds=5)  # the first stop, 5 s ago
    with pytest.raises(SystemExit):
        worker.request_force_stop(signal.SIGTERM, None)
    state.finished = object()
    worker.request_force_stop(signal.SIGTERM, None)  # kept warm: no exit
