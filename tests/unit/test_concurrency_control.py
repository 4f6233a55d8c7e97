"""Concurrency controllers (rlstream/sampling/concurrency.py): the window bounds what is in
flight; the adaptive one grows while the server answers fast, halves on 429/503 (once per
cooldown) and on rising latency, and, driven through the remote sampler against a server
that answers 429 above a fixed capacity, settles near that capacity with no failed draw.
Counts, never timings, are asserted."""
from __future__ import annotations

import asyncio
import itertools
import threading
from pathlib import Path

import httpx
import pytest
from factories import legacy_config

from rlstream.core.config import InferenceConfig
from rlstream.core.messages import WeightsPublished
from rlstream.sampling import remote as remote_policy
from rlstream.sampling.concurrency import (
    AdaptiveConcurrencyController,
    FixedConcurrencyController,
    MetricsPoller,
    parse_histogram,
    vllm_queue_time_probe,
)
from rlstream.sampling.remote import RemotePolicy, RemoteSampler


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def hold(controller, counter: dict, release=lambda c: c.release(0.1)) -> None:
    await controller.acquire()
    counter["max"] = max(counter["max"], controller.in_flight)
    await asyncio.sleep(0.001)
    release(controller)


def test_fixed_window_bounds_requests_in_flight():
    controller, seen = FixedConcurrencyController(3), {"max": 0}

    async def main():
        await asyncio.gather(*(hold(controller, seen) for _ in range(20)))

    asyncio.run(main())
    assert seen["max"] == 3 == controller.peak_in_flight
    assert controller.in_flight == 0
    with pytest.raises(ValueError):
        FixedConcurrencyController(0)


def test_one_controller_serves_several_loops_and_threads():
    """The SDK loop calls asyncio.run per row; a worker has its own loop thread."""
    controller, seen = FixedConcurrencyController(2), {"max": 0}

    def run_batch():
        async def main():
            await asyncio.gather(*(hold(controller, seen) for _ in range(10)))
        asyncio.run(main())

    run_batch()
    run_batch()  # a second loop: nothing is bound to the first
    threads = [threading.Thread(target=run_batch) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert seen["max"] <= 2 and controller.in_flight == 0


def test_a_cancelled_waiter_gives_its_slot_back():
    controller = FixedConcurrencyController(1)

    async def main():
        await controller.acquire()
        waiter = asyncio.ensure_future(controller.acquire())
        await asyncio.sleep(0)
        waiter.cancel()
        controller.release()
        await asyncio.gather(waiter, return_exceptions=True)
        await asyncio.wait_for(controller.acquire(), 5)  # the slot is free again
        controller.release()

    asyncio.run(main())
    assert controller.in_flight == 0


def test_a_request_of_n_holds_n_slots_in_arrival_order():
    """A group merged into one request of n (docs/design.md §15.74 One request per group) holds
    n slots, as its n single requests did; one larger than the window goes alone; none passes an earlier one."""
    controller = FixedConcurrencyController(16)

    async def main():
        await controller.acquire(8)
        await controller.acquire(8)
        third = asyncio.ensure_future(controller.acquire(8))
        small = asyncio.ensure_future(controller.acquire(1))  # queued behind the third: waits too
        await asyncio.sleep(0.01)
        assert controller.in_flight == 16 and not third.done() and not small.done()
        controller.release(n=8)
        await asyncio.wait_for(third, 5)
        await asyncio.sleep(0.01)
        assert controller.in_flight == 16 and not small.done()  # no room for one more
        controller.release(n=8)
        await asyncio.wait_for(small, 5)
        for n in (8, 1):
            controller.release(n=n)
        await asyncio.wait_for(controller.acquire(40), 5)  # larger than the window: alone, not stuck
        big_behind = asyncio.ensure_future(controller.acquire(1))
        await asyncio.sleep(0.01)
        assert not big_behind.done()
        controller.release(n=40)
        await asyncio.wait_for(big_behind, 5)
        controller.release()

    asyncio.run(main())
    assert controller.in_flight == 0 and controller.peak_in_flight == 40


def test_a_waiter_cancelled_after_its_slots_were_granted_gives_them_back_once():
    controller = FixedConcurrencyController(8)

    async def main():
        await controller.acquire(8)
        waiter = asyncio.ensure_future(controller.acquire(4))
        await asyncio.sleep(0)
        controller.release(n=8)  # grants the waiter its 4 slots (resolved on the next pass)...
        waiter.cancel()  # ...but it is cancelled first: the 4 go back
        await asyncio.gather(waiter, return_exceptions=True)
        assert controller.in_flight == 0
        queued = asyncio.ensure_future(controller.acquire(4))
        await controller.acquire(8)
        other = asyncio.ensure_future(controller.acquire(4))
        await asyncio.sleep(0)
        other.cancel()  # cancelled while queued: it took nothing, gives nothing back
        await asyncio.gather(other, return_exceptions=True)
        controller.release(n=8)
        await asyncio.wait_for(queued, 5)
        assert controller.in_flight == 4
        controller.release(n=4)

    asyncio.run(main())
    assert controller.in_flight == 0


def test_adaptive_window_grows_under_merged_requests():
    """Requests of n = 8 with more waiting than fit: the window is what holds them back, though
    it is rarely filled to its last slot (18 holds two), so it grows as it does for n = 1."""
    controller = AdaptiveConcurrencyController(initial_window=16, max_window=64, adjust_every=32)

    async def main():
        for _ in range(60):
            takers = [asyncio.ensure_future(controller.acquire(8)) for _ in range(64 // 8)]
            await asyncio.sleep(0)
            done = 0
            while done < len(takers):
                ready = [t for t in takers if t.done()]
                for _ in ready[done:]:
                    controller.release(0.1, n=8)
                done = len(ready)
                await asyncio.sleep(0)

    asyncio.run(main())
    assert controller.window == 64 and controller.in_flight == 0


def fill_and_release(controller, latency: float, completions: int) -> None:
    """``completions`` requests, each taken while the window is full (so it may grow)."""
    async def main():
        for _ in range(completions):
            takers = [asyncio.ensure_future(controller.acquire()) for _ in range(controller.window)]
            await asyncio.gather(*takers)
            for _ in takers:
                controller.release(latency)

    asyncio.run(main())


def test_adaptive_window_grows_while_fast_and_full_and_not_when_unused():
    grows = AdaptiveConcurrencyController(initial_window=16, adjust_every=32)
    fill_and_release(grows, latency=0.1, completions=10)
    assert grows.window > 16 and grows.shrinks == 0

    idle = AdaptiveConcurrencyController(initial_window=16, adjust_every=32)

    async def one_at_a_time():
        for _ in range(200):
            await idle.acquire()
            idle.release(0.1)

    asyncio.run(one_at_a_time())
    assert idle.window == 16  # never full: nothing to learn about more concurrency


def test_adaptive_window_halves_on_overload_once_per_cooldown():
    clock = FakeClock()
    controller = AdaptiveConcurrencyController(initial_window=16, cooldown_s=1.0, clock=clock)

    async def overloaded(times: int):
        for _ in range(times):
            await controller.acquire()
            controller.release(overloaded=True)

    asyncio.run(overloaded(5))
    assert controller.window == 8 and controller.shrinks == 1  # a burst of 429s is one signal
    clock.now = 1.5
    asyncio.run(overloaded(1))
    assert controller.window == 4
    clock.now = 10.0
    asyncio.run(overloaded(10))
    assert controller.window == 2


def test_adaptive_window_halves_when_latency_rises_over_its_target():
    controller = AdaptiveConcurrencyController(initial_window=32, adjust_every=32)
    fill_and_release(controller, latency=0.1, completions=2)  # baseline 0.1 s
    before = controller.window
    fill_and_release(controller, latency=5.0, completions=3)  # the EMA passes 2 x baseline
    assert controller.window < before and controller.shrinks >= 1


def test_a_queue_time_server_is_judged_by_queue_time_even_between_its_readings():
    """vLLM's /metrics answers only every few seconds (no news between): long generations (2 s
    of latency) must not be judged against the 0.5 s queue-time target meanwhile."""
    readings = itertools.cycle([None, 0.01])
    controller = AdaptiveConcurrencyController(initial_window=16, adjust_every=4,
                                               queue_time_probe=lambda: next(readings))
    fill_and_release(controller, latency=2.0, completions=12)
    assert controller.shrinks == 0 and controller.window >= 16


def test_queue_time_probe_reads_vllm_histogram_deltas():
    texts = iter(["vllm:request_queue_time_seconds_sum{model=\"m\"} 1.0\n"
                  "vllm:request_queue_time_seconds_count{model=\"m\"} 10\n",
                  "vllm:request_queue_time_seconds_sum{model=\"m\"} 4.0\n"
                  "vllm:request_queue_time_seconds_count{model=\"m\"} 16\n", ""])
    probe = vllm_queue_time_probe(lambda: next(texts))
    assert probe() is None  # the first reading is a baseline
    assert probe() == pytest.approx(0.5)  # 3 s over 6 requests
    assert probe() is None  # no metrics: fall back to latency
    assert parse_histogram("other 1\n", "vllm:request_queue_time_seconds") == (None, None)


def test_metrics_poller_keeps_vllm_metrics_and_gives_up_on_a_server_without_them():
    vllm = httpx.MockTransport(lambda request: httpx.Response(
        200, text="vllm:request_queue_time_seconds_sum 2.0\nvllm:request_queue_time_seconds_count 4\n"))
    poller = MetricsPoller("http://server.test/metrics", transport=vllm)
    assert poller.poll_once() and poller.available and "queue_time" in poller.text
    plain = MetricsPoller("http://server.test/metrics", transport=httpx.MockTransport(lambda r: httpx.Response(404)))
    assert not plain.poll_once() and plain.available is False and plain.text is None

    def refuse(request):
        raise httpx.ConnectError("refused")

    down = MetricsPoller("http://server.test/metrics", transport=httpx.MockTransport(refuse), max_failures=3)
    assert [down.poll_once() for _ in range(3)] == [True, True, False]  # bounded: then latency is the signal


def test_a_proxys_passing_5xx_is_a_failed_fetch_not_a_server_without_metrics():
    """One 502 (a proxy in front of vLLM) keeps the last reading and asks again next period;
    only ``max_failures`` of them in a row give up, as failed connections do."""
    answers = iter([200, 502, 503, 200] + [502] * 3)
    text = "vllm:request_queue_time_seconds_sum 2.0\nvllm:request_queue_time_seconds_count 4\n"
    poller = MetricsPoller("http://server.test/metrics", max_failures=3, transport=httpx.MockTransport(
        lambda request: httpx.Response(code := next(answers), text=text if code == 200 else "bad gateway")))
    assert [poller.poll_once() for _ in range(4)] == [True, True, True, True]
    assert poller.available and "queue_time" in poller.text  # the 5xx did not drop the reading
    assert [poller.poll_once() for _ in range(3)] == [True, True, False] and poller.text is None


def test_adaptive_controller_settles_under_a_server_that_refuses_above_its_capacity(monkeypatch):
    """A server that answers 429 to every request beyond CAPACITY in flight. 64 concurrent
    callers draw 1200 completions through the remote sampler: every draw succeeds (the
    window backs off instead of hammering into failures) and the window ends near the
    capacity, having been cut at least once."""
    monkeypatch.setattr(remote_policy, "BACKOFF_BASE_S", 0.001)
    capacity, state = 24, {"in_flight": 0, "refused": 0, "served": 0}

    async def handler(request: httpx.Request) -> httpx.Response:
        if state["in_flight"] >= capacity:
            state["refused"] += 1
            return httpx.Response(429, json={"error": "overloaded"})
        state["in_flight"] += 1
        try:
            await asyncio.sleep(0.005)
        finally:
            state["in_flight"] -= 1
        state["served"] += 1
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "finish_reason": "stop",
                                                      "token_ids": [5], "logprobs": {"token_logprobs": [-0.5]}}]})

    # The cooldown is counted in served requests, not seconds (one window's worth, as 1 s is for a
    # real server), and the latency target is far above the stand-in's: only the 429s steer the
    # window, so a loaded machine's pauses cannot change what the test sees.
    controller = AdaptiveConcurrencyController(initial_window=16, cooldown_s=1.0, target=10.0,
                                               clock=lambda: state["served"] / capacity)
    cfg = InferenceConfig(backend="openai", base_url="http://inference.test/v1", max_retries=4)
    published = WeightsPublished(version=0, uri="/w/v0", sha256="0" * 64, bytes=1)
    windows: list[int] = []

    async def main():
        policy = RemotePolicy(cfg, published, tokenizer=None, model_name="m", weights_root=Path("/w"),
                              transport=httpx.MockTransport(handler))
        sampler = RemoteSampler(policy, {"max_tokens": 4, "temperature": 1.0}, concurrency_controller=controller)
        queue = list(range(1200))

        async def caller():
            while queue:
                queue.pop()
                out = await sampler.sample_with_prompt_tokens([1, 2, 3])
                assert len(out) == 1
                windows.append(controller.window)

        await asyncio.gather(*(caller() for _ in range(64)))

    asyncio.run(main())
    assert state["served"] == 1200  # no failed draw: each one was eventually served
    assert controller.shrinks >= 1 and state["refused"] > 0  # it did probe past the capacity, and backed off
    late = windows[-300:]
    assert max(late) <= 2 * capacity and min(late) >= capacity // 4, (min(late), max(late))
    assert controller.in_flight == 0


def test_workers_choose_their_controller_from_the_config():
    from rlstream.workers.runtime import make_controller

    openai = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "max_concurrency": 96}
    fixed = make_controller(legacy_config(inference=openai, workers={"concurrency_control": "fixed"}))
    assert isinstance(fixed, FixedConcurrencyController) and fixed.window == 96
    adaptive = make_controller(legacy_config(inference=openai, workers={"concurrency_control": "adaptive"}))
    assert isinstance(adaptive, AdaptiveConcurrencyController)
    assert (adaptive.window, adaptive.max_window) == (16, 96) and adaptive.queue_time_probe is not None
    small = make_controller(legacy_config(inference={**openai, "max_concurrency": 8},
                                          workers={"concurrency_control": "adaptive"}))
    assert (small.window, small.max_window) == (8, 8)
    one = make_controller(legacy_config(inference={**openai, "max_concurrency": 1}))
    assert (one.window, one.min_window, one.max_window) == (1, 1, 1)


def test_the_default_config_backs_off_a_remote_server():
    """Out of the box a worker against an openai server adapts its window (backs off on
    429/503), so a shared or overloaded server is not hammered (issue 20, item 3)."""
    from rlstream.workers.runtime import make_controller

    cfg = legacy_config(inference={"backend": "openai", "base_url": "http://127.0.0.1:9/v1"})
    assert cfg.workers.concurrency_control == "adaptive"
    controller = make_controller(cfg)
    assert isinstance(controller, AdaptiveConcurrencyController)
    assert (controller.window, controller.max_window) == (16, cfg.inference.max_concurrency)
