"""The shared sampling loop of a worker holding several groups (workers/sampling_loop.py)
and its job slots (workers/slots.py): a job's coroutine runs on the loop thread; past its
deadline it fails with rq's JobTimeoutException and every task it started is cancelled,
while another job's draws go on; a loop that cannot cancel is reported stuck; slots bound
the jobs held at once by a capacity that may change."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
from factories import legacy_config
from rq.timeouts import JobTimeoutException

from rlstream.workers.sampling_loop import SamplingLoop
from rlstream.workers.slots import JobSlots, holds_several, worker_slots


@pytest.fixture
def sampling():
    loop = SamplingLoop(grace_s=5.0)
    yield loop
    loop.close()


def test_a_job_past_its_deadline_is_cancelled_with_its_tasks_and_others_go_on(sampling):
    cancelled: dict = {}
    other: dict = {}
    gate = threading.Event()

    async def slow_job():
        async def draw():
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled["draw"] = True
                raise

        asyncio.ensure_future(draw())  # a task the rollout_fn started and never awaited
        await asyncio.gather(draw(), draw())

    async def other_job():
        await asyncio.get_running_loop().run_in_executor(None, gate.wait, 30)
        return "done"

    thread = threading.Thread(target=lambda: other.update(result=sampling.run(other_job(), 60)))
    thread.start()
    with pytest.raises(JobTimeoutException):
        sampling.run(slow_job(), 0.2)
    assert cancelled == {"draw": True} and not sampling.stuck
    gate.set()
    thread.join(30)
    assert other == {"result": "done"}  # the timeout of one job cancelled none of another's tasks


def test_tasks_a_job_left_behind_end_with_it(sampling):
    leftover: list[asyncio.Task] = []

    async def job():
        leftover.append(asyncio.ensure_future(asyncio.sleep(60)))
        return 7

    assert sampling.run(job(), 10) == 7
    deadline = time.monotonic() + 10
    while not leftover[0].done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leftover[0].cancelled()


def test_a_loop_blocked_by_a_rollout_fn_is_reported_stuck():
    sampling = SamplingLoop(grace_s=0.1)

    async def blocking():
        time.sleep(1.0)  # a blocking call inside an async function: nothing can cancel it

    with pytest.raises(JobTimeoutException):
        sampling.run(blocking(), 0.05)
    assert sampling.stuck
    assert sampling.run(asyncio.sleep(0, result="free"), 10) == "free"  # once the call returns, the loop runs again
    sampling.close()


def test_job_slots_count_draws_not_groups():
    """Room is counted in unfinished draws: a group waiting on one slow draw holds one request of
    the window, and the next group is taken as soon as the draws fall below it."""
    window = {"now": 8}
    slots = JobSlots(lambda: window["now"], group_size=4, max_jobs=6)
    run = {}  # job id -> the token of its run
    run["a"] = slots.take("a")
    run["b"] = slots.take("b")
    assert not slots.wait_for_room(0.01)  # 2 groups of 4 draws fill a window of 8
    window["now"] = 12
    assert slots.wait_for_room(0.01)
    window["now"] = 8
    for _ in range(3):
        slots.draw_done(run["a"])  # three of a's draws finished, one (a straggler) still out
    assert slots.outstanding == 5 and slots.wait_for_room(0.01)
    run["c"] = slots.take("c")  # 9 draws for a window of 8: c's last draw waits for a request slot
    assert slots.outstanding == 9 and not slots.wait_for_room(0.01)
    slots.draw_done(run["b"], 4)  # b's first round is done, one member missing ...
    slots.more(run["b"], 1)  # ... and redrawn
    assert slots.outstanding == 6 and slots.wait_for_room(0.01)
    slots.drawn(run["b"])  # its draws are done: no room held while rq records it
    assert slots.outstanding == 5 and slots.busy and not slots.wait_idle(0.01)
    slots.draw_done(999)  # a run the slots never took: ignored
    slots.drawn(run["a"])
    slots.draw_done(run["a"])  # a late report of a finished job changes nothing
    assert slots.outstanding == 4
    window["now"] = 1
    for job in "abc":
        slots.release(run[job])
    assert slots.outstanding == 0 and slots.wait_for_room(0.01)  # one group always fits, however small the window
    run["d"] = slots.take("d")
    assert not slots.wait_for_room(0.01) and slots.peak == 3 and slots.peak_outstanding == 9
    slots.release(run["d"])
    assert slots.wait_idle(0.01)


def test_job_slots_count_every_group_a_job_carries():
    """A job of several groups holds all their draws from the moment it is taken; a group the
    job skips gives its room back at once."""
    slots = JobSlots(lambda: 16, group_size=4, max_jobs=8)
    run = {}  # job id -> the token of its run
    run["ab"] = slots.take("ab", 8)  # two groups of 4
    assert slots.outstanding == 8 and slots.wait_for_room(0.01)
    run["cd"] = slots.take("cd", 8)
    assert slots.outstanding == 16 and not slots.wait_for_room(0.01)
    slots.draw_done(run["cd"], 4)  # one of its groups skipped (a bad row): its 4 draws are never sent
    assert slots.outstanding == 12 and slots.wait_for_room(0.01)
    slots.draw_done(run["ab"], 20)  # never below zero
    assert slots.outstanding == 4


def test_job_slots_wake_the_waiter_only_when_there_is_room():
    """A finished draw wakes the thread waiting for room only if it made room (a thread woken
    to find none costs CPU and sleeps again), and at once when it did."""
    import threading

    slots = JobSlots(lambda: 4, group_size=2)
    run = {}  # job id -> the token of its run
    run["a"] = slots.take("a")
    run["b"] = slots.take("b")
    notified = []
    original = slots._changed.notify_all
    slots._changed.notify_all = lambda: (notified.append(slots.outstanding), original())
    slots.draw_done(run["a"])  # nobody waits: nobody is woken
    assert notified == []
    run["c"] = slots.take("c")  # 5 draws for a window of 4
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: slots.wait_for_room(10) and woke.set())
    waiter.start()
    deadline = time.monotonic() + 10
    while not slots._waiting:  # the waiter is inside wait_for_room (bounded: a hung start fails here)
        assert time.monotonic() < deadline, "the waiter never started waiting"
        time.sleep(0.001)
    slots.draw_done(run["b"])  # 4 left of 4: still full, the waiter sleeps on
    assert notified == [] and not woke.wait(0.05)
    slots.draw_done(run["b"])  # 3 of 4: room
    assert woke.wait(5) and notified == [3]
    waiter.join()


def test_job_slots_bound_the_jobs_held():
    """However few draws are unfinished, at most ``max_jobs`` groups are held (memory), counting
    the ones rq is still recording."""
    slots = JobSlots(lambda: 64, group_size=4, max_jobs=3)
    run = {}  # job id -> the token of its run
    for job in "abc":
        run[job] = slots.take(job)
        slots.draw_done(run[job], 3)  # each down to one straggler: 3 of 64 draws
    assert not slots.wait_for_room(0.01)
    slots.drawn(run["a"])
    assert not slots.wait_for_room(0.01)  # still held while rq records it
    slots.release(run["a"])
    assert slots.wait_for_room(0.01)


def test_which_workers_hold_several_groups():
    openai = {"backend": "openai", "base_url": "http://x/v1"}
    assert not holds_several(legacy_config(completions_per_prompt=8))  # local, one group: as before
    assert holds_several(legacy_config(completions_per_prompt=8, workers={"local_max_batch": 32}))
    assert holds_several(legacy_config(completions_per_prompt=8, inference=openai))
    assert not holds_several(legacy_config(completions_per_prompt=8, inference={**openai, "max_concurrency": 8}))
    slots = worker_slots(legacy_config(completions_per_prompt=8, workers={"local_max_batch": 32}), controller=None)
    assert slots is not None and slots.window() == 32 and slots.max_jobs == 32
    slots = worker_slots(legacy_config(completions_per_prompt=8, inference=openai, workers={"max_groups_held": 12}),
                         controller=type("Controller", (), {"window": 40})())
    assert slots.window() == 40 and slots.max_jobs == 12 and slots.group_size == 8
