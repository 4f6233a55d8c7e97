"""How many completions a sampler keeps in flight against an inference server: a fixed window
(``FixedConcurrencyController``) or one that adapts to what the server says
(``AdaptiveConcurrencyController``, additive increase / multiplicative decrease).

Both are used the same way around every HTTP request, which holds as many slots of the window
as completions it asks for (its ``n``: a group's draws merged into one request hold G, as the
G requests they replace did; docs/design.md §15.74 One request per group)::

    await controller.acquire(n)                # waits while the window has no room for n
    ...send...
    controller.release(latency_s=0.31, n=n, tokens=k)  # k: tokens generated (0: unknown);
                                               # or overloaded=True on 429/503/transport errors

A request that is retried releases its slot before the back-off and acquires one again, so
a window that shrank on the error really carries fewer requests on the retry.

The controllers are thread-safe and loop-agnostic (waiters are futures of whichever event
loop awaited them, woken with ``call_soon_threadsafe``): one controller can serve a worker's
sampling loop, several ``asyncio.run`` calls in a row (the cookbook's SDK loop does that), or
samplers on several loops. docs/design.md §15.51 Adaptive concurrency, AIMD over latency.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)
MIN_WINDOW, MAX_WINDOW = 1, 256
NO_QUEUE_TIME = -1.0  # a queue_time_probe's answer once the server has no queue-time metrics (any more)
RETRY_BASE_S, RETRY_CAP_S = 15.0, 60.0  # a MetricsPoller that gave up asks again after 15 s, doubling to 60 s


class _Window:
    """A counting semaphore whose size may change while requests are in flight. A request takes
    ``n`` slots; one larger than the whole window goes alone (with nothing else in flight), so
    it is never stuck."""

    def __init__(self, window: int):
        self._lock = threading.Lock()
        self._window = window
        self.in_flight = 0  # slots taken: completions asked for by the requests in flight
        self.peak_in_flight = 0  # the most ever in flight at once (tests, metrics)
        self._waiters: deque[_Waiter] = deque()

    @property
    def window(self) -> int:
        return self._window

    async def acquire(self, n: int = 1) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._waiters and self._room(n):
                self._take(n)
                return
            waiter = _Waiter(loop.create_future(), n)
            self._waiters.append(waiter)
        try:
            await waiter.fut
        except asyncio.CancelledError:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                elif waiter.granted:  # the slots were handed over as the cancellation landed: give them back
                    self.in_flight -= n
                self._wake()  # a waiter behind this one may fit now
            raise

    def _release_slot(self, n: int = 1) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - n)
            self._wake()

    def _set_window(self, window: int) -> None:
        with self._lock:
            self._window = window
            self._wake()

    def saturated(self) -> bool:
        """Whether the window is what holds requests back: full, or too full for the next one in
        line (requests of n = G rarely fill a window to its last slot)."""
        with self._lock:
            return self.in_flight >= self._window or bool(self._waiters) and not self._room(self._waiters[0].n)

    def _room(self, n: int) -> bool:
        return self.in_flight == 0 or self.in_flight + n <= self._window

    def _take(self, n: int) -> None:
        self.in_flight += n
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def _wake(self) -> None:
        """Hand free slots to waiters in arrival order (called with the lock held): the first in
        line waits for room for all its slots, and no later one passes it."""
        while self._waiters and (self._waiters[0].fut.done() or self._room(self._waiters[0].n)):
            waiter = self._waiters.popleft()
            if waiter.fut.done():  # cancelled while queued: its own handler gives nothing back
                continue
            self._take(waiter.n)
            waiter.granted = True
            waiter.fut.get_loop().call_soon_threadsafe(_resolve, waiter.fut)


class _Waiter:
    """A request queued for ``n`` slots; ``granted`` once they are taken for it."""

    def __init__(self, fut: asyncio.Future, n: int):
        self.fut, self.n, self.granted = fut, n, False


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class FixedConcurrencyController(_Window):
    """At most ``window`` completions in flight: for a server whose capacity is known."""

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"FixedConcurrencyController: window must be >= 1, got {window}")
        super().__init__(window)

    def release(self, latency_s: float | None = None, *, overloaded: bool = False, n: int = 1,
                tokens: int = 0) -> None:
        self._release_slot(n)


class AdaptiveConcurrencyController(_Window):
    """AIMD over what the server says.

    Every ``adjust_every`` completions (a request of n counts n) the window is judged on the EMA (``alpha``) of the
    signal: the server's queue time when ``queue_time_probe`` gives one (vLLM's /metrics,
    ``vllm_queue_time_probe``), else the request latency. Above ``target`` the window is
    halved (``decrease``); at or below it, and only if the window was full during the
    interval (``saturated``: a window that is never used must not grow), it grows by
    ``increase x min(target / EMA, max_increase_scale)``. Without an explicit target the
    latency target is ``latency_tolerance`` x the lowest interval latency seen (latency
    grows with output length, so no absolute number fits every task), and, when requests
    say how many tokens they generated (``release(tokens=)``), the latency per generated
    token is judged beside it against ``latency_tolerance`` x its own lowest: the window is
    over its target only when both are (``latency_load``), so completions that grow longer
    (per request slower, per token not) or shorter (per token slower: a request's fixed cost
    spreads over fewer tokens; per request faster) do not shrink it, and a server's queue,
    which slows both, does. A 429/503 or a transport error (``release(overloaded=True)``)
    halves the window at once, at most once per ``cooldown_s``: a burst of errors from one
    full window is one signal, not many.
    """

    def __init__(self, initial_window: int = 16, *, min_window: int = MIN_WINDOW, max_window: int = MAX_WINDOW,
                 target: float | None = None, alpha: float = 0.3, adjust_every: int = 32, increase: float = 1.0,
                 max_increase_scale: float = 4.0, decrease: float = 0.5, cooldown_s: float = 1.0,
                 latency_tolerance: float = 2.0, queue_time_probe: Callable[[], float | None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if not 1 <= min_window <= max_window:
            raise ValueError(f"AdaptiveConcurrencyController: need 1 <= min_window <= max_window, got "
                             f"{min_window}, {max_window}")
        if not 0 < alpha <= 1 or not 0 < decrease < 1 or adjust_every < 1 or target is not None and target <= 0:
            raise ValueError("AdaptiveConcurrencyController: need 0 < alpha <= 1, 0 < decrease < 1, "
                             "adjust_every >= 1 and target > 0")
        super().__init__(min(max(initial_window, min_window), max_window))
        self.min_window, self.max_window = min_window, max_window
        self.target, self.alpha, self.adjust_every = target, alpha, adjust_every
        self.increase, self.max_increase_scale, self.decrease = increase, max_increase_scale, decrease
        self.cooldown_s, self.latency_tolerance = cooldown_s, latency_tolerance
        self.queue_time_probe, self.clock = queue_time_probe, clock
        self.ema: float | None = None  # of the queue time, or of the mean latency per completion
        self.token_ema: float | None = None  # of the latency per generated token (when requests say their tokens)
        self.last_queue_time: float | None = None  # the probe's newest reading
        self.baseline: float | None = None  # lowest interval mean latency seen
        self.token_baseline: float | None = None  # lowest interval latency per generated token seen
        self.shrinks = 0  # how often the window was cut (tests, metrics)
        self._state = threading.Lock()
        self._completions, self._interval_latency, self._full = 0, 0.0, False
        self._counted_latency, self._interval_tokens = 0.0, 0  # over the requests that said their tokens
        self._cooldown_until = -math.inf

    def release(self, latency_s: float | None = None, *, overloaded: bool = False, n: int = 1,
                tokens: int = 0) -> None:
        """``tokens``: what the request generated, its n completions together (0: not known; then only
        the latency per completion is judged)."""
        with self._state:
            self._full |= self.saturated()
            if overloaded:
                self._shrink("the server is overloaded (429/503 or a transport error)")
            elif latency_s is not None:
                self._completions += n
                self._interval_latency += latency_s * n
                if tokens > 0:
                    self._counted_latency += latency_s * n
                    self._interval_tokens += tokens
                if self._completions >= self.adjust_every:
                    self._adjust()
        self._release_slot(n)

    def _adjust(self) -> None:
        mean_latency = self._interval_latency / self._completions
        # the sum of latencies over the sum of tokens (mean latency / mean length), not a mean of per-request
        # ratios, which the shortest completions (a fixed cost over a few tokens) would dominate
        per_token = self._counted_latency / self._interval_tokens if self._interval_tokens else None
        full = self._full
        self._completions, self._interval_latency, self._full = 0, 0.0, False
        self._counted_latency, self._interval_tokens = 0.0, 0
        queue_time = self.queue_time_probe() if self.queue_time_probe is not None else None
        if queue_time is not None and queue_time < 0:  # NO_QUEUE_TIME: the server's metrics are gone
            queue_time = None
        elif queue_time is None:  # no reading this interval: once the server told its queue time, its last word
            queue_time = self.last_queue_time  # stands; seconds of latency must never meet the queue-time target
        if (queue_time is not None) != (self.last_queue_time is not None):
            self.ema = self.token_ema = None  # the first queue-time reading: an average of latencies is no queue time
        self.last_queue_time = queue_time
        if queue_time is not None:
            self.ema = ema(self.ema, queue_time, self.alpha)
            load = relative_load(self.ema, self.target if self.target is not None else 0.5)
            why = f"queue-time EMA {self.ema:.3f}s over its target"
        elif self.target is not None:  # an absolute latency target: per completion only
            self.ema = ema(self.ema, mean_latency, self.alpha)
            load = relative_load(self.ema, self.target)
            why = f"latency EMA {self.ema:.3f}s over the target {self.target:.3f}s"
        else:
            self.baseline = mean_latency if self.baseline is None else min(self.baseline, mean_latency)
            self.ema = ema(self.ema, mean_latency, self.alpha)
            if per_token is not None:
                self.token_baseline = per_token if self.token_baseline is None else min(self.token_baseline,
                                                                                        per_token)
                self.token_ema = ema(self.token_ema, per_token, self.alpha)
            load = latency_load(self.ema, self.baseline, self.token_ema if per_token is not None else None,
                                self.token_baseline, self.latency_tolerance)
            why = (f"latency EMA {self.ema:.3f}s over {self.latency_tolerance:g} x the lowest {self.baseline:.3f}s"
                   + ("" if per_token is None else f", and {1000 * self.token_ema:.2f} ms per generated token "
                                                   f"over {self.latency_tolerance:g} x the lowest "
                                                   f"{1000 * self.token_baseline:.2f} ms"))
        if load > 1:
            self._shrink(why)
        elif full:
            scale = self.max_increase_scale if load <= 0 else min(1 / load, self.max_increase_scale)
            grown = min(self.max_window, self.window + max(1, round(self.increase * scale)))
            self._set_window(grown)

    def _shrink(self, why: str) -> None:
        now = self.clock()
        if now < self._cooldown_until:
            return
        self._cooldown_until = now + self.cooldown_s
        smaller = max(self.min_window, int(self.window * self.decrease))
        if smaller < self.window:
            self.shrinks += 1
            log.info("concurrency window %d -> %d: %s", self.window, smaller, why)
        self._set_window(smaller)


def ema(previous: float | None, value: float, alpha: float) -> float:
    """An exponential moving average's next value (the first value starts it)."""
    return value if previous is None else alpha * value + (1 - alpha) * previous


def relative_load(signal: float, target: float) -> float:
    """``signal`` as a multiple of its target: over 1 shrinks the window, under it lets it grow."""
    if target <= 0:  # a baseline of 0 s (a stand-in server): anything above it is over
        return 0.0 if signal <= 0 else math.inf
    return signal / target


def latency_load(latency_ema: float, baseline: float, token_ema: float | None, token_baseline: float | None,
                 tolerance: float) -> float:
    """The load a latency-judged window answers to: the latency per completion over ``tolerance`` x
    its run's lowest, or, when the tokens generated are known, the smaller of that and the same
    ratio per generated token. Both rise with a server's queue; only one rises when completions
    grow longer (per completion) or shorter (per token: a fixed cost over fewer tokens), which
    is no sign of load. Both baselines are the run's lowest: a recent one drifts up with a
    saturated server's queue and never halts the growth (docs/design.md §15.51 Adaptive concurrency,
    AIMD over latency)."""
    load = relative_load(latency_ema, tolerance * baseline)
    if token_ema is None or token_baseline is None:
        return load
    return min(load, relative_load(token_ema, tolerance * token_baseline))


def vllm_queue_time_probe(metrics_text: Callable[[], str | None]) -> Callable[[], float | None]:
    """A ``queue_time_probe`` over vLLM's Prometheus text (``GET /metrics``): the mean
    ``vllm:request_queue_time_seconds`` of the requests finished since the previous call,
    None when there is no news, or ``NO_QUEUE_TIME`` while ``metrics_text`` is None (a
    ``MetricsPoller`` that gave up: then latency is used, not the last reading). The first
    reading after that is a new baseline: the server may have restarted and counted from 0."""
    last = {"sum": None, "count": None}

    def probe() -> float | None:
        text = metrics_text()
        if text is None:
            last.update(sum=None, count=None)
            return NO_QUEUE_TIME
        if not text:
            return None
        total, count = parse_histogram(text, QUEUE_TIME)
        if total is None or count is None:
            return None
        previous_sum, previous_count = last["sum"], last["count"]
        last.update(sum=total, count=count)
        if previous_count is None or count <= previous_count:
            return None
        return (total - previous_sum) / (count - previous_count)

    return probe


def parse_histogram(text: str, name: str) -> tuple[float | None, float | None]:
    """(sum, count) of a Prometheus histogram, added over its label sets."""
    sums = counts = None
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(name + suffix):
                try:
                    value = float(line.rsplit(" ", 1)[1])
                except (IndexError, ValueError):
                    continue
                if suffix == "_sum":
                    sums = (sums or 0.0) + value
                else:
                    counts = (counts or 0.0) + value
    return sums, counts


class MetricsPoller:
    """The newest text of a server's Prometheus ``/metrics``, fetched by a daemon thread every
    ``period_s`` (one GET, off the sampling loop: cheap). It gives up once the server answers
    with no vLLM queue-time histogram (a 200 without it, a 404), or after ``max_failures``
    fetches in a row fail (no connection, a 5xx or 429); its text is then None
    (``vllm_queue_time_probe`` answers ``NO_QUEUE_TIME``: latency is the signal). Given up, it
    still asks, slowly: after ``retry_s[0]`` seconds, doubling to at most ``retry_s[1]``
    (``doubling_wait_s``), so a worker started before its vLLM is up, or one whose server
    restarted for longer, takes up queue time again from the first usable answer, and polls
    every ``period_s`` again."""

    def __init__(self, url: str, period_s: float = 2.0, headers: dict[str, str] | None = None,
                 transport: object = None, max_failures: int = 5,
                 retry_s: tuple[float, float] = (RETRY_BASE_S, RETRY_CAP_S)):
        import httpx  # only the openai backend polls

        self.url, self.period_s, self.text = url, period_s, None
        self._client = httpx.Client(timeout=min(5.0, period_s), headers=headers or {}, transport=transport)
        self._stop = threading.Event()
        self.available: bool | None = None  # unknown until the first answer; False while given up
        self.max_failures, self._failures = max_failures, 0
        self.retry_s, self._retries = retry_s, 0  # fetches that failed since it gave up

    @property
    def wait_s(self) -> float:
        """The wait before the next fetch: ``period_s``, or, given up, the slow retry's."""
        return self.period_s if self.available is not False else doubling_wait_s(self._retries, *self.retry_s)

    def poll_once(self) -> bool:
        """One fetch; False while the server has no usable metrics (given up)."""
        try:
            response = self._client.get(self.url)
        except Exception as exc:  # a server restarting or not up yet: try again next period, a few times
            log.debug("metrics poll of %s: %s", self.url, exc)
            return self._failed(f"{type(exc).__name__}: {exc}")
        if response.status_code >= 500 or response.status_code == 429:  # failing for now (a proxy's 502), not "none"
            return self._failed(f"HTTP {response.status_code}")
        self._failures = 0
        usable = response.status_code == 200 and parse_histogram(response.text, QUEUE_TIME)[1] is not None
        if not usable:
            self._give_up(f"HTTP {response.status_code}" + ("" if response.status_code != 200
                                                              else " without vLLM's queue-time histogram"))
            return False
        if self.available is False:
            log.info("vLLM queue-time metrics at %s again: the concurrency window follows queue time", self.url)
        self.available, self.text, self._retries = True, response.text, 0
        return True

    def _failed(self, why: str) -> bool:
        """A fetch the server did not answer for itself (no connection; a 5xx or a 429, its own or
        its proxy's): the last reading stands and the next period asks again, up to
        ``max_failures`` in a row; then, or once given up, it gives up (again)."""
        self._failures += 1
        if self._failures >= self.max_failures or self.available is False:
            self._give_up(why)
            return False
        return True

    def _give_up(self, why: str) -> None:
        if self.available is False:
            self._retries += 1
        else:
            self._retries = 0
            log.info("no vLLM queue-time metrics at %s (%s): the concurrency window follows request latency; "
                     "asking again every %.0f-%.0fs", self.url, why, *self.retry_s)
        self.available, self.text = False, None  # its last reading must not stand for the server's

    def run(self) -> None:
        """Poll until ``stop``: every ``period_s``, or at the slow retry's pace while given up."""
        while True:
            self.poll_once()
            if self._stop.wait(self.wait_s):
                return

    def start(self) -> MetricsPoller:
        threading.Thread(target=self.run, name="metrics-poller", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()


def doubling_wait_s(attempts: int, base_s: float, cap_s: float) -> float:
    """An exponential back-off's wait after ``attempts`` failed ones: ``base_s``, doubling, at
    most ``cap_s`` (a poller that gave up; a draw's retries, ``remote.backoff_s``)."""
    return min(base_s * 2 ** min(attempts, 16), cap_s)


QUEUE_TIME = "vllm:request_queue_time_seconds"
