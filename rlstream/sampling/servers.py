"""The inference servers one sampler uses (``inference.base_url``: one, or several replicas):
which one it prefers, which are up, and what it does when its own stops answering. It fails
over to the next live one at once (with a warning), probes the down one again after a back-off
and goes back to it when it answers, and while none is up it waits, bounded by
``inference.start_timeout``: the engine may be restarting (``rlstream up`` restarts the ones it
launched), and a draw that waits is neither lost nor counted as a failed draw. docs/design.md
§15.71 Engines sync through their own routes.

Liveness only: which version a server serves is rlstream.sampling.remote's concern.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

from rlstream.sampling.engines import InferenceError, server_root

log = logging.getLogger(__name__)
WAIT_POLL_CAP_S = 2.0  # while none is up: look again at least this often
WAIT_POLL_MIN_S = 0.05  # ... and at most this often (another draw's probe may be under way)


def preferred_index(worker_id: str, servers: int) -> int:
    """A stable server index for a worker that was given none (the same id, the same server)."""
    return zlib.crc32(worker_id.encode()) % max(1, servers)


@dataclass(eq=False)
class Server:
    """One inference server and what this process knows of it."""

    index: int
    url: str  # inference.base_url: the OpenAI API root, .../v1
    new_client: Callable[[], Any]  # builds an async HTTP client for its completions
    version: int | None = None  # the version it is known to serve; None = unknown: read (or reload) before use
    down_since: float | None = None  # when it stopped answering; None = up
    retry_at: float = 0.0  # a down server is probed again from then on
    failures: int = 0  # failed probes (or requests) in a row: the back-off grows with them
    forgotten: int = 0  # times mark_down forgot its version: a weight push sent before the last one may be lost
    probing: bool = False
    refusal: str | None = None  # why it is unfit (the logprobs probe): every request to it fails with this
    sync_lock: threading.Lock = field(default_factory=threading.Lock)  # one sync of it at a time in this process
    shared: dict = field(default_factory=dict)  # in-flight calls shared by the draws on one loop (remote.py)

    _client: tuple[Any, Any] | None = None  # (event loop, its client)

    def client(self) -> Any:
        """The async client of the running event loop. Pooled connections belong to the loop
        that opened them: a caller that runs one loop after another (``asyncio.run`` per call,
        as the SDK's loop does) gets a client per loop, never a connection of a closed one."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            self._client = (loop, self.new_client())
        return self._client[1]

    def close_client(self, timeout: float = 5.0) -> None:
        """Close the async client from outside its loop (``RemotePolicy.close``): on the loop's
        own thread while it runs (a worker's sampling loop), else on the loop here. Nothing to do
        once the loop is closed: ``asyncio.run`` closed the client with it
        (rlstream.sampling.http)."""
        if self._client is None:
            return
        (loop, client), self._client = self._client, None
        if loop.is_closed() or not hasattr(client, "aclose"):
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # called on the loop itself: close it in the background
            _background(client.aclose())
        elif loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout)
            except Exception as exc:  # a stuck loop (the worker stops anyway): leave it to the process's end
                log.warning("the HTTP client of %s did not close within %.0fs: %r", self.url, timeout, exc)
        elif running is None:
            loop.run_until_complete(client.aclose())

    @property
    def root(self) -> str:
        return server_root(self.url)

    @property
    def up(self) -> bool:
        return self.down_since is None


class ServerPool:
    """``pick()`` -> the server to send the next request to.

    ``probe(server) -> bool`` (blocking, run in a thread) tells whether a down server answers
    again (vLLM's and SGLang's ``/health``); without one (a generic server may have no health
    route) a down server is tried again by the next request once its back-off has passed.
    """

    def __init__(self, servers: list[Server], prefer: int = 0, probe: Callable[[Server], bool] | None = None,
                 start_timeout: float = 900.0, backoff: tuple[float, float] = (0.5, 8.0),
                 clock: Callable[[], float] = time.monotonic):
        if not servers:
            raise ValueError("ServerPool needs at least one server")
        self.servers, self.probe, self.start_timeout = servers, probe, start_timeout
        self.backoff_base, self.backoff_cap = backoff
        self.clock = clock
        self.prefer = prefer % len(servers)
        self._lock = threading.Lock()

    @property
    def preferred(self) -> Server:
        return self.servers[self.prefer]

    def order(self) -> list[Server]:
        """The preferred server first, then the others in the configured order after it."""
        n = len(self.servers)
        return [self.servers[(self.prefer + i) % n] for i in range(n)]

    def mark_down(self, server: Server, why: str) -> None:
        """``server`` stopped answering: skip it until a probe (or, without one, a request
        after the back-off) finds it up. Its version is unknown from now on: an engine that
        restarted serves other weights."""
        with self._lock:
            now = self.clock()
            first = server.down_since is None
            if first:
                server.down_since = now
            server.version = None
            server.forgotten += 1
            delay = min(self.backoff_base * 2 ** server.failures, self.backoff_cap)
            server.failures += 1
            server.retry_at = now + delay
        if first:
            others = [s.url for s in self.servers if s.up]
            log.warning("inference server %s stopped answering (%s); %s; trying it again in %.1fs", server.url, why,
                        f"using {others[0]} meanwhile" if others else "no other server is up: waiting for one "
                        f"(at most {self.start_timeout:.0f}s, inference.start_timeout)", delay)

    def mark_up(self, server: Server) -> None:
        with self._lock:
            was_down = server.down_since is not None
            server.down_since, server.failures, server.retry_at = None, 0, 0.0
        if was_down:
            log.info("inference server %s answers again", server.url)

    async def pick(self) -> Server:
        """The preferred server when it is up, else the next one that is. A down server whose
        back-off has passed is probed: in the background while another serves, awaited while
        none does. Raises ``InferenceError`` once none has answered for ``start_timeout``."""
        while True:
            order, now = self.order(), self.clock()
            for i, s in enumerate(order):
                if s.up:
                    if self.probe is not None:  # one it would rather use may be back: look, without waiting
                        for earlier in order[:i]:
                            if now >= earlier.retry_at and not earlier.probing:
                                _background(self._probe(earlier))
                    return s
                if self.probe is None and now >= s.retry_at:
                    return s  # no health route: the request is the probe (mark_down() again if it fails)
            for s in order if self.probe is not None else []:
                if now >= s.retry_at and not s.probing and await self._probe(s):
                    return s
            now = self.clock()
            downs = [s.down_since for s in order if s.down_since is not None]
            if len(downs) < len(order):
                continue  # one came up while this one was probed
            deadline = min(downs) + self.start_timeout
            if now >= deadline:
                raise InferenceError(
                    f"no inference server answered for {self.start_timeout:.0f}s (inference.start_timeout): "
                    f"{', '.join(s.url for s in order)}. Check that they are up and that inference.base_url is "
                    "right (a server `rlstream up` launched logs to runs/<run>/logs/engine-<i>.log)")
            next_retry = min(s.retry_at for s in order)
            await asyncio.sleep(max(WAIT_POLL_MIN_S, min(next_retry - now, deadline - now, WAIT_POLL_CAP_S)))

    async def _probe(self, server: Server) -> bool:
        server.probing = True
        try:
            ok = await asyncio.to_thread(self.probe, server)
        finally:
            server.probing = False
        if ok:
            self.mark_up(server)
        else:
            self.mark_down(server, "no answer to its health probe")
        return ok


_BACKGROUND: set[asyncio.Task] = set()  # the loop keeps only weak references to its tasks


def _background(coro: Any) -> None:
    task = asyncio.ensure_future(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
