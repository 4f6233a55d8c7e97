"""A flaky TCP proxy for the network-fault tests: it forwards 127.0.0.1:<port> to a target
(a redis-server's TCP port) and, on a seeded schedule, delays bytes, cuts established
connections (mid-command: whatever was in flight on either side is lost with them) and
refuses new connections for a while. It runs an asyncio loop in a thread of the test process.

    with FlakyProxy(("127.0.0.1", redis_port), seed=7) as proxy:
        proxy.port          # point clients here
        proxy.stats         # what it did: connections, cuts, refused, delayed chunks

``chaos=False`` forwards faithfully (e.g. while the run starts); ``set_chaos`` switches it.
Every fault is decided by one ``random.Random(seed)``, so a failing schedule can be replayed
(the order of connections still depends on the processes' timing).
"""
from __future__ import annotations

import asyncio
import logging
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class Schedule:
    """The fault rates. Each forwarded chunk is delayed with ``delay_p`` by up to ``delay_max_s``;
    every ``cut_every_s`` (jittered) the proxy cuts each established connection with
    ``cut_p``, and with ``refuse_p`` refuses new connections for up to ``refuse_max_s``; each
    chunk the server sends back is, with ``lose_reply_p``, dropped and its connection cut (the
    worst cut: the server ran the command, the client never hears so and sends it again)."""

    delay_p: float = 0.05
    delay_max_s: float = 0.4
    cut_every_s: float = 2.0
    cut_p: float = 0.5
    refuse_p: float = 0.3
    refuse_max_s: float = 1.5
    lose_reply_p: float = 0.0  # a reply chunk is dropped and its connection cut: the command ran, its answer is lost


class FlakyProxy:
    def __init__(self, target: tuple[str, int], seed: int = 0, schedule: Schedule | None = None,
                 chaos: bool = True):
        self.target = target
        self.rng = random.Random(seed)
        self.schedule = schedule or Schedule()
        self.chaos = chaos
        self.stats: Counter[str] = Counter()
        self.port = 0
        self._refuse_until = 0.0
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None

    def set_chaos(self, on: bool) -> None:
        self.chaos = on
        if not on:
            self._refuse_until = 0.0

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> FlakyProxy:
        self._thread = threading.Thread(target=self._run, name="flaky-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the flaky proxy did not start")
        return self

    def __exit__(self, *exc_info) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        self.port = listener.getsockname()[1]
        server = await asyncio.start_server(self._accept, sock=listener)
        chaos = asyncio.create_task(self._chaos())
        self._ready.set()
        await self._stop.wait()
        chaos.cancel()
        server.close()
        for a, b in list(self._conns):
            a.close()
            b.close()
        await server.wait_closed()

    # ------------------------------------------------------------------ faults

    async def _chaos(self) -> None:
        s = self.schedule
        while True:
            await asyncio.sleep(s.cut_every_s * (0.5 + self.rng.random()))
            if not self.chaos:
                continue
            for client, upstream in list(self._conns):
                if self.rng.random() < s.cut_p:
                    self.stats["cut"] += 1
                    self._abort(client)
                    self._abort(upstream)
            if self.rng.random() < s.refuse_p:
                self.stats["refuse_windows"] += 1
                self._refuse_until = time.monotonic() + s.refuse_max_s * self.rng.random()

    @staticmethod
    def _abort(writer: asyncio.StreamWriter) -> None:
        """An RST, not a FIN: the peer sees a reset connection, as when a route dies."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            except OSError:
                pass
        writer.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["accepted"] += 1
        if self.chaos and time.monotonic() < self._refuse_until:
            self.stats["refused"] += 1
            self._abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.stats["upstream_unreachable"] += 1
            self._abort(writer)
            return
        pair = (writer, up_writer)
        self._conns.add(pair)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer, pair))
        finally:
            self._conns.discard(pair)
            for w in pair:
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    replies_of: tuple | None = None) -> None:
        s = self.schedule
        try:
            while data := await reader.read(65536):
                if replies_of is not None and self.chaos and self.rng.random() < s.lose_reply_p:
                    self.stats["replies_lost"] += 1
                    for w in replies_of:
                        self._abort(w)
                    return
                if self.chaos and self.rng.random() < s.delay_p:
                    self.stats["delayed"] += 1
                    await asyncio.sleep(s.delay_max_s * self.rng.random())
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - already aborted
                pass
