"""A stand-in OpenAI-compatible inference server whose only cost is latency: benchmarks and
tests point rlstream's openai backend at it to measure (or observe) rollout concurrency
without a GPU. It answers ``POST /v1/completions`` the way vLLM does with
``return_token_ids`` (random token ids below ``--vocab-size``, a logprob for each), accepts
``POST /update_weights_from_disk`` (SGLang's weight sync), and serves ``GET /stats`` (JSON:
requests, in flight, the most ever in flight, 429s).

Each request sleeps for a latency drawn from a distribution (``--latency``):

    const:0.2                 every request 0.2 s
    uniform:0.1:0.3           uniform between 0.1 and 0.3 s
    lognormal:0.2:1.0         median 0.2 s, sigma 1.0 (a long tail)
    bimodal:0.1:3.0:0.05      0.1 s, except 5 % of requests that take 3.0 s (stragglers)

plus ``--per-token-s`` for every generated token. With ``--capacity N`` a request arriving
while N are in flight is answered 429 at once (a saturated server). In process, ``hold()`` makes
every request that arrives wait (in flight) until ``release()``: a test freezes its workers'
progress at a point of its choosing instead of racing them. The server is one asyncio
loop (HTTP/1.1 keep-alive, no framework), so hundreds of requests in flight cost nothing.

    python bench/standin_server.py --latency lognormal:0.2:1.0 --port-file /tmp/port
    # or in process: StandinServer("const:0.1", capacity=24).start() -> base URL
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import threading
import time
from pathlib import Path
from typing import Any, Callable


def latency_sampler(spec: str) -> Callable[[random.Random], float]:
    """A function rng -> seconds for a ``--latency`` spec (see the module docstring)."""
    kind, *raw = spec.split(":")
    args = [float(a) for a in raw]
    shapes: dict[str, tuple[int, Callable[[random.Random], float]]] = {
        "const": (1, lambda rng: args[0]),
        "uniform": (2, lambda rng: rng.uniform(args[0], args[1])),
        "lognormal": (2, lambda rng: args[0] * math.exp(args[1] * rng.gauss(0.0, 1.0))),
        "bimodal": (3, lambda rng: args[1] if rng.random() < args[2] else args[0]),
    }
    if kind not in shapes or len(args) != shapes[kind][0]:
        raise ValueError(f"latency spec {spec!r}: use const:S, uniform:LO:HI, lognormal:MEDIAN:SIGMA or "
                         "bimodal:FAST:SLOW:P_SLOW")
    return shapes[kind][1]


class StandinServer:
    """The server, run on its own event loop in a daemon thread (``start`` returns its
    base URL, ``http://127.0.0.1:PORT``; the API root is that + ``/v1``)."""

    def __init__(self, latency: str = "const:0.1", *, capacity: int | None = None, vocab_size: int = 16,
                 per_token_s: float = 0.0, seed: int = 0, host: str = "127.0.0.1", port: int = 0):
        self.latency, self.capacity, self.vocab_size = latency_sampler(latency), capacity, vocab_size
        self.per_token_s, self.rng, self.host, self.port = per_token_s, random.Random(seed), host, port
        self.in_flight = self.peak_in_flight = self.requests = self.rejected = 0
        self.weight_updates: list[dict[str, Any]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._open = asyncio.Event()  # cleared by ``hold``: completions wait for it (used on the server's loop only)
        self._open.set()

    @property
    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "in_flight": self.in_flight, "peak_in_flight": self.peak_in_flight,
                "rejected": self.rejected, "weight_updates": len(self.weight_updates)}

    def reset_peak(self) -> None:
        self.peak_in_flight = self.in_flight

    def hold(self) -> None:
        """From now on, answer no arriving completion until ``release`` (those already answering finish)."""
        self._on_loop(self._open.clear)

    def release(self) -> None:
        self._on_loop(self._open.set)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        if self.loop is None:
            fn()
        else:
            asyncio.run_coroutine_threadsafe(_call(fn), self.loop).result(10)

    def start(self) -> str:
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            self._server = self.loop.run_until_complete(asyncio.start_server(self._client, self.host, self.port,
                                                                             backlog=4096))
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, name="standin-server", daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("the stand-in server did not start within 10 s")
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Close the listener and every open connection, then stop the loop."""
        if self.loop is None or self._server is None or not self.loop.is_running():
            return

        async def shutdown() -> None:
            self._server.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                status, body = await self._route(*request)
                data = json.dumps(body).encode()
                writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: "
                             f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path == "/stats":
            return 200, self.stats
        if method == "POST" and path == "/update_weights_from_disk":
            self.weight_updates.append(json.loads(body))
            return 200, {"success": True}
        if method == "POST" and path == "/v1/completions":
            return await self._complete(json.loads(body))
        return 404, {"error": f"no route {method} {path}"}

    async def _complete(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """In flight and capacity count completions, as a real server's batch does: a request of
        n (a merged group, docs/design.md §15.74 One request per group) counts n."""
        self.requests += 1
        n = int(request.get("n", 1))
        if self.capacity is not None and self.in_flight and self.in_flight + n > self.capacity:
            self.rejected += 1
            return 429, {"error": {"message": "server overloaded", "type": "rate_limit"}}
        self.in_flight += n
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            choices = [self._choice(i, int(request["max_tokens"])) for i in range(n)]
            tokens = max(len(c["token_ids"]) for c in choices)
            await self._open.wait()
            await asyncio.sleep(max(0.0, self.latency(self.rng)) + self.per_token_s * tokens)
            return 200, {"choices": choices}
        finally:
            self.in_flight -= n

    def _choice(self, index: int, max_tokens: int) -> dict[str, Any]:
        length = self.rng.randint(1, max(1, max_tokens))
        ids = [self.rng.randrange(3, self.vocab_size) for _ in range(length)]
        logprobs = [-self.rng.uniform(0.1, 3.0) for _ in ids]
        return {"index": index, "text": "", "finish_reason": "length" if length == max_tokens else "stop",
                "token_ids": ids, "logprobs": {"tokens": [f"token_id:{t}" for t in ids], "token_logprobs": logprobs}}


async def _call(fn: Callable[[], None]) -> None:
    fn()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes] | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, *_ = line.decode("latin-1").split()
    length = 0
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return method, path, await reader.readexactly(length) if length else b""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", default="const:0.1", help="latency distribution (see the module docstring)")
    parser.add_argument("--capacity", type=int, default=None, help="answer 429 above this many requests in flight")
    parser.add_argument("--vocab-size", type=int, default=16, help="token ids are drawn below this")
    parser.add_argument("--per-token-s", type=float, default=0.0, help="extra seconds per generated token")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--port-file", type=Path, default=None, help="write the port here once listening")
    args = parser.parse_args()
    server = StandinServer(args.latency, capacity=args.capacity, vocab_size=args.vocab_size,
                           per_token_s=args.per_token_s, seed=args.seed, port=args.port)
    url = server.start()
    if args.port_file is not None:
        args.port_file.write_text(str(server.port))
    print(f"stand-in server at {url}/v1 (latency {args.latency}, capacity {args.capacity})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
