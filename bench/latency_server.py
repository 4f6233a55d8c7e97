"""A stand-in OpenAI-compatible inference server for the benchmarks: no model, a configurable
latency per completion.

    python bench/latency_server.py --latency lognormal:0.25,1.0 --port-file /tmp/port

``POST /v1/completions`` answers every completion of the request (``n``) after its latency,
drawn i.i.d. per completion from the distribution (the request returns when its slowest
completion is done, as a server generating the ``n`` sequences side by side would), with
``max_tokens`` random token ids below ``--vocab``, each with logprob log(1/vocab), in the shape
vLLM gives with ``return_token_ids`` (the shape tests/e2e/openai_server.py gives too). The text
is the last token id mod 10 as a digit, so the built-in task's exact-match reward is a coin with
p = 0.1 rather than always 0. ``POST /update_weights_from_disk`` (SGLang's weight sync) records
the version, optionally reading every ``*.safetensors`` file of ``model_path`` (``--read-weights``)
as a server loading them would. ``GET /stats`` reports requests served, the most in flight at
once, the seconds spent at each count of completions in flight (``in_flight_seconds``: the
in-flight count over time, as a histogram) and the versions seen.

Latency distributions (seconds):

* ``fixed:S``                 every completion takes S
* ``lognormal:MEDIAN,SIGMA``  a long tail: the p99 is MEDIAN * exp(2.33 * SIGMA)
* ``mix:FAST,SLOW,P``         FAST, or SLOW with probability P (a bimodal tail)

Requests are served concurrently (asyncio; no thread per request), so hundreds can be in
flight. Used by bench/async_speedup.py, which starts it in a thread of its own process.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable


def parse_latency(spec: str, seed: int = 0) -> Callable[[], float]:
    """A sampler of completion latencies in seconds from ``kind:params``."""
    rng = random.Random(seed)
    kind, _, params = spec.partition(":")
    values = [float(x) for x in params.split(",")] if params else []
    if kind == "fixed" and len(values) == 1:
        return lambda: values[0]
    if kind == "lognormal" and len(values) == 2:
        median, sigma = values
        return lambda: median * math.exp(rng.gauss(0.0, sigma))
    if kind == "mix" and len(values) == 3:
        fast, slow, p = values
        return lambda: slow if rng.random() < p else fast
    raise ValueError(f"latency {spec!r}: expected fixed:S, lognormal:MEDIAN,SIGMA or mix:FAST,SLOW,P")


class LatencyServer:
    """The server's state and its two routes; ``start`` runs it on a background thread."""

    def __init__(self, latency: str, vocab: int = 16, seed: int = 0, read_weights: bool = False):
        self.draw = parse_latency(latency, seed)
        self.rng = random.Random(seed + 1)
        self.vocab, self.read_weights = vocab, read_weights
        self.in_flight = self.max_in_flight = self.requests = 0
        self.in_flight_seconds: Counter[int] = Counter()  # seconds spent at each in-flight count
        self._level_since = time.monotonic()
        self.versions: list[int] = []
        self.port = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    async def completions(self, body: dict) -> dict:
        n, max_tokens = int(body.get("n", 1)), max(1, int(body.get("max_tokens", 1)))
        self._move(+n)  # in flight counts completions, as a server's batch does (a request of n counts n)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(max(self.draw() for _ in range(n)))
        finally:
            self._move(-n)
            self.requests += 1
        logprob = -math.log(self.vocab)
        choices = []
        for i in range(n):
            ids = [self.rng.randrange(self.vocab) for _ in range(max_tokens)]
            choices.append({"index": i, "text": str(ids[-1] % 10), "finish_reason": "length", "token_ids": ids,
                            "logprobs": {"tokens": [f"token_id:{t}" for t in ids],
                                         "token_logprobs": [logprob] * len(ids)}})
        return {"choices": choices}

    def _move(self, step: int) -> None:
        """Change the in-flight count, charging the time since the last change to the old count."""
        now = time.monotonic()
        self.in_flight_seconds[self.in_flight] += now - self._level_since
        self._level_since, self.in_flight = now, self.in_flight + step

    def update_weights(self, body: dict) -> dict:
        if self.read_weights:
            for f in sorted(Path(body["model_path"]).glob("*.safetensors")):
                f.read_bytes()
        self.versions.append(int(body.get("version", -1)))
        return {"success": True}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:  # keep-alive: httpx reuses connections
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, path, _ = request_line.split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
                raw = await reader.readexactly(int(headers.get("content-length", 0)))
                body = json.loads(raw) if raw else {}
                if method == "POST" and path.endswith("/completions"):
                    status, reply = 200, await self.completions(body)
                elif method == "POST" and path == "/update_weights_from_disk":
                    status, reply = 200, self.update_weights(body)
                elif method == "GET" and path == "/stats":
                    status, reply = 200, self.stats()
                else:
                    status, reply = 404, {"error": f"no route {method} {path}"}
                data = json.dumps(reply).encode()
                writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Not Found'}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def stats(self) -> dict:
        self._move(0)  # the current count's time up to now
        return {"requests": self.requests, "in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "in_flight_seconds": dict(self.in_flight_seconds), "versions": self.versions}

    def reset_stats(self) -> None:
        self.requests = self.max_in_flight = 0
        self.in_flight_seconds, self._level_since = Counter(), time.monotonic()
        self.versions = []

    def start(self) -> LatencyServer:
        """Serve on 127.0.0.1 (a free port, ``self.port``) from a daemon thread."""
        ready = threading.Event()

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=1024))
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, name="latency-server", daemon=True).start()
        if not ready.wait(30):
            raise RuntimeError("the latency server did not start within 30 s")
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--latency", default="lognormal:0.25,1.0",
                    help="fixed:S | lognormal:MEDIAN,SIGMA | mix:FAST,SLOW,P")
    ap.add_argument("--vocab", type=int, default=16, help="token ids are drawn below this (the built-in model's 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--read-weights", action="store_true", help="read the safetensors files on a weight sync")
    ap.add_argument("--port-file", type=Path, help="write the port here once listening")
    args = ap.parse_args()
    server = LatencyServer(args.latency, args.vocab, args.seed, args.read_weights).start()
    if args.port_file:
        args.port_file.write_text(str(server.port))
    print(f"serving {server.base_url}/v1/completions with latency {args.latency}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
