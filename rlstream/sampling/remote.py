"""Sampling from inference servers over HTTP (``inference.backend`` "openai", "vllm" or
"sglang"): anything that serves ``POST {base_url}/completions``, one server or several replicas.
The completions go through rlstream.sampling.http (aiohttp, answers and errors as httpx's);
weight syncs, version reads and probes through httpx's blocking clients.

The wire contract, and why:
- prompts go out as token ids (``"prompt": [ids]``, part of the OpenAI completions API), so
  multi-turn rollouts never re-tokenize what the policy already produced;
- generated token ids come back as ``choices[i].token_ids`` (vLLM's ``return_token_ids``)
  or as ``"token_id:<id>"`` strings in ``logprobs.tokens`` (vLLM's
  ``return_tokens_as_token_ids``); we ask for both. A server that returns neither is an
  error: decoding text back to ids would silently change the trained tokens;
- behaviour logprobs are ``logprobs.token_logprobs``, one per generated token. They must
  be of the distribution the token was drawn from, after temperature: start vLLM with
  ``--logprobs-mode processed_logprobs`` (its default reports the raw, un-tempered ones);
- ``top_k`` 0 ("off" in rlstream) is sent as -1, the value vLLM and SGLang read as off.

Weight sync is pull-based as everywhere in rlstream, through the engine's own routes
(rlstream.sampling.engines) and the worker's own run directory (``<run>/weights/v<N>``, never a
path from the event: Redis is not trusted with paths); the server must see that directory at
the same path (a shared volume). docs/design.md §15.71 Engines sync through their own routes:
- vllm, sglang: before a request goes to a server, it must serve the version the worker
  loaded (``load``): the version it reports is adopted when new enough, else the worker takes
  the server's sync lock (``sync_lock``: a Redis lock in workers, so several workers sharing a
  server reload it once per version), reads again and reloads if still behind, retrying a
  refused reload within ``inference.weight_sync_timeout``. Each completion is stamped with
  min(the version the server was known to serve before it was sent, the version it reports
  after the answer): a server that answers with an older version restarted with other weights,
  so its samples are stamped with that older one and it is reloaded before its next request;
- openai: ``{"model_path", "version"}`` is POSTed to ``inference.weight_sync_url``, and samples
  are stamped N once the server said 2xx (a completion answered while that POST is in flight
  carries N as its newest version: the server may switch at any moment of it); without a sync
  URL the server is never told, samples are stamped v0, and the trainer's offsets show it. Such
  a server cannot say which version it serves, so one that stopped answering, a dropped
  connection included (it may have restarted with its base weights), is sent the current version
  again before its next request; pushes go one at a time, so none of an older version lands after
  a newer one; a restart that no request noticed cannot be seen (use vllm / sglang, whose servers
  report their version, where that matters).

Servers are picked by rlstream.sampling.servers (a preferred one, fail-over, waiting while none
is up). Retries only here, at the I/O edge: timeouts, 408 and 5xx but 503 are retried ``max_retries``
times with exponential backoff; any other 4xx fails at once with the server's message; a server
that does not answer at all (connection refused or dropped) is failed over, not counted (but
from a server's second request in a row dropped while it is believed up, each counts: one whose health
probe answers while it drops every request would otherwise be asked forever), and neither is
one that says to come back later (429, 503): the draw goes at once to another server that is up
and did not say so, and only when every one up did, waits for the first it may ask again (after
the longer of its ``Retry-After`` and the backoff), while that lasts less than
``inference.start_timeout``: a busy or rate-limited server loses no draw (the job's timeout still
bounds the wait).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import functools
import itertools
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

import httpx

from rlstream.core import keys, weights
from rlstream.core.config import InferenceConfig
from rlstream.core.messages import WeightsPublished
from rlstream.core.rollout import NO_LIMIT, Completion, chat_prompt_ids, no_room, token_budget
from rlstream.sampling import stamps
from rlstream.sampling.concurrency import FixedConcurrencyController, doubling_wait_s
from rlstream.sampling.engines import (
    EngineError,
    EngineRefused,
    InferenceError,
    engine_for,
    healthy,
    logprobs_after_temperature,
)
from rlstream.sampling.http import CompletionsClient
from rlstream.sampling.servers import Server, ServerPool

log = logging.getLogger(__name__)
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 8.0
RELOAD_BACKOFF_S = (1.0, 15.0)  # between refused reloads (base, cap), within inference.weight_sync_timeout
PROBE_TIMEOUT_S = 5.0  # health probes and version reads: a server that takes longer is not answering
# How long a sync lock's holder may hold it past weight_sync_timeout: the version read before the
# reload (PROBE_TIMEOUT_S) and the resumes after a reload that used up its bound (engines.RESUME_*).
SYNC_LOCK_MARGIN_S = 60.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
OVERLOAD_STATUS = frozenset({429, 503})  # the server asks for less: the concurrency window shrinks at once
RETRY_AFTER_CAP_S = 60.0  # the longest a Retry-After header may make one draw wait before asking again
# The server did not answer at all (down, restarting): fail over, do not count a failed attempt.
DOWN_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
               httpx.WriteError)
PROBE_PROMPT = [0, 1, 2]  # token ids every vocabulary has: the logprobs probe's prompt
__all__ = ["InferenceError", "RemotePolicy", "RemoteSampler", "SyncLockBusy", "completion_request",
           "parse_completions", "redis_sync_lock"]


def _headers(cfg: InferenceConfig) -> dict[str, str]:
    if not cfg.api_key_env:
        return {}
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise InferenceError(f"inference.api_key_env names {cfg.api_key_env}, which is not set in the environment")
    return {"Authorization": f"Bearer {key}"}


def completion_request(model: str, prompt: list[int], n: int, *, max_tokens: int, temperature: float,
                       top_p: float = 1.0, top_k: int = 0, max_seq_len: int = NO_LIMIT) -> dict[str, Any]:
    """The JSON body of one ``/completions`` call."""
    new_tokens = token_budget(len(prompt), max_tokens, max_seq_len)
    if new_tokens < 1:
        raise no_room(len(prompt), max_seq_len)
    return {"model": model, "prompt": list(prompt), "n": n, "max_tokens": new_tokens, "temperature": temperature,
            "top_p": top_p, "top_k": top_k if top_k > 0 else -1, "logprobs": 0, "echo": False,
            "return_token_ids": True, "return_tokens_as_token_ids": True, "skip_special_tokens": False}


def _choice_token_ids(choice: dict[str, Any]) -> list[int]:
    if choice.get("token_ids") is not None:
        return [int(t) for t in choice["token_ids"]]
    tokens = (choice.get("logprobs") or {}).get("tokens") or []
    if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return [int(t.removeprefix("token_id:")) for t in tokens]
    raise InferenceError("the inference server returned no generated token ids (neither choices[].token_ids nor "
                         "'token_id:<id>' logprob tokens); use a server that honours return_token_ids or "
                         "return_tokens_as_token_ids (vLLM does)")


def parse_completions(body: dict[str, Any], prompt: list[int], version: int) -> list[Completion]:
    """``/completions`` response -> one ``Completion`` per choice, in choice order."""
    out = []
    for choice in sorted(body.get("choices") or [], key=lambda c: c.get("index", 0)):
        ids = _choice_token_ids(choice)
        logprobs = [float(x) for x in ((choice.get("logprobs") or {}).get("token_logprobs") or [])]
        if len(logprobs) != len(ids) or not ids:
            raise InferenceError(f"the inference server returned {len(ids)} token ids but {len(logprobs)} logprobs; "
                                 "it must return one logprob per generated token (request field logprobs=0)")
        reason = choice.get("finish_reason")
        out.append(Completion(full_tokens=list(prompt) + ids, prompt_len=len(prompt), inference_logprobs=logprobs,
                              finish_reason="length" if reason == "length" else "stop",
                              text=choice.get("text") or "", version=version))
    return out


def no_lock(url: str) -> ContextManager[None]:
    """The sync lock of a process that shares its servers with no one (the SDK, tests)."""
    return contextlib.nullcontext()


class SyncLockBusy(InferenceError):
    """Another process holds a server's sync lock (raised only to a caller that would not wait)."""


def redis_sync_lock(r: Any, run_id: str, timeout: float,
                    wait: float | None = None) -> Callable[[str], ContextManager[None]]:
    """``sync_lock`` for workers: one Redis lock per run and server (``keys.engine_sync_lock``),
    held while a worker reads a server's version and reloads it (``timeout``: the reload's
    bound, ``inference.weight_sync_timeout``). It expires ``SYNC_LOCK_MARGIN_S`` after that, when
    no live holder can still be reloading (a holder that crashed mid-reload frees it); a waiter
    waits up to twice that, so it outlasts a crashed holder's lock and then reloads itself.
    ``wait``: seconds to wait instead (0: one try), then ``SyncLockBusy``."""
    import redis

    ttl = timeout + SYNC_LOCK_MARGIN_S

    @contextlib.contextmanager
    def hold(url: str):
        lock = r.lock(keys.engine_sync_lock(run_id, url), timeout=ttl,
                      blocking_timeout=2 * ttl if wait is None else wait)
        if not lock.acquire():
            if wait is not None:
                raise SyncLockBusy(f"the weight-sync lock of {url} is held")
            raise InferenceError(f"the weight-sync lock of {url} stayed taken for {2 * ttl:.0f}s: another "
                                 "worker's reload hangs; check that server (inference.weight_sync_timeout bounds one "
                                 "reload)")
        try:
            yield
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:  # it expired: the reload outlasted the bound it was given
                log.warning("the weight-sync lock of %s expired before its reload ended (inference.weight_sync_timeout"
                            " %.0fs + %.0fs)", url, timeout, SYNC_LOCK_MARGIN_S)

    return hold


class RemotePolicy:
    """The worker's view of its inference servers: the version it wants them to serve
    (``version``), its tokenizer (loaded from the published weights directory), the servers
    (``pool``) and the HTTP clients.

    ``prefer``: the index of the server this worker sends to while it is up. ``sync_lock``:
    url -> context manager held around a server's read-and-reload (``redis_sync_lock``;
    default: none). ``namespace``: the run id the engine labels versions with. ``exact``: a
    server must serve exactly ``version``, not a newer one (the SDK's deployment, which may go
    back to an older snapshot). ``check_logprobs``: probe each vllm server for post-temperature
    logprobs before its first sync, and again after it restarted (an external server, whose
    flags rlstream did not choose)."""

    def __init__(self, cfg: InferenceConfig, published: WeightsPublished, tokenizer: Any, model_name: str,
                 weights_root: str | Path, transport: httpx.AsyncBaseTransport | None = None,
                 sync_transport: httpx.BaseTransport | None = None, controller: Any = None, *, prefer: int = 0,
                 sync_lock: Callable[[str], ContextManager[None]] = no_lock, namespace: str = "",
                 exact: bool = False, check_logprobs: bool = False, api_key: str | None = None):
        """``controller``: the concurrency controller every request goes through
        (rlstream.sampling.concurrency); unset = a fixed window of ``max_concurrency``.
        ``api_key``: a bearer token given in code (the SDK's ``DeploymentSampler(api_key=)``),
        instead of ``inference.api_key_env``."""
        self.cfg, self.tokenizer, self.model_name = cfg, tokenizer, model_name
        self.weights_root = Path(weights_root)  # the run's weights/: version N is <weights_root>/v<N>
        self.engine = engine_for(cfg.backend, weight_sync_url=cfg.weight_sync_url, namespace=namespace)
        self.sync_lock, self.exact, self.check_logprobs = sync_lock, exact, check_logprobs
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else _headers(cfg)
        self._sync = httpx.Client(timeout=cfg.timeout, headers=headers, transport=sync_transport)  # reloads
        self._probe = httpx.Client(timeout=min(PROBE_TIMEOUT_S, cfg.timeout), headers=headers,
                                   transport=sync_transport)  # health and version reads
        servers = [Server(i, url, functools.partial(CompletionsClient, url, timeout=cfg.timeout, headers=headers,
                                                    transport=transport))
                   for i, url in enumerate(cfg.base_urls)]
        probe = (lambda s: healthy(self._probe, s.root)) if self.engine.tracks_versions else None
        self.pool = ServerPool(servers, prefer, probe, cfg.start_timeout, (BACKOFF_BASE_S, BACKOFF_CAP_S))
        self.controller = controller if controller is not None else FixedConcurrencyController(cfg.max_concurrency)
        self.version = 0  # what the servers are to serve: the base model until a sync succeeds
        # openai: one weight push at a time (load's and the resyncs, all to weight_sync_url), and the version
        # being pushed while one is in flight: a completion answered meanwhile may have been computed with it.
        self._push_lock = threading.Lock()
        self._pushing: int | None = None
        self.load(published)

    def load(self, published: WeightsPublished) -> None:
        """Serve ``published`` from now on. openai: POST it (bounded retries), then stamp with
        it. vllm / sglang: the preferred server is synced now (its errors are the caller's),
        any other before its next request."""
        wanted = published.version
        if not self.engine.tracks_versions:
            if self.engine.syncs and wanted > self.version:
                with self._push_lock:
                    self._push(wanted)
            return
        if wanted == self.version or (wanted < self.version and not self.exact):
            return
        previous, self.version = self.version, wanted
        server = self.pool.preferred
        if not server.up:
            return  # synced once it answers again
        try:
            self._sync_server(server)
        except httpx.TransportError as exc:
            self.pool.mark_down(server, f"{type(exc).__name__}: {exc}")
        except InferenceError:
            self.version = previous  # the next load tries again
            raise

    def _push(self, wanted: int) -> None:
        """openai: POST ``wanted`` to ``weight_sync_url`` and stamp with it from then on (under
        ``_push_lock``). Completions answered while the POST is in flight are stamped up to it
        (``_pushing``): the server may switch at any moment of it."""
        if wanted <= self.version:  # another job's load got there first
            return
        directory = weights.version_dir(self.weights_root, wanted).resolve()
        # A server that stopped answering during the POST may have restarted after taking it: it stays unknown
        # (mark_down forgot it) and is told again before its next request, not marked told by this POST.
        forgotten = {server: server.forgotten for server in self.pool.servers}
        self._pushing = wanted
        try:
            try:
                self.engine.reload(self._sync, "", directory, wanted)
            except httpx.TransportError as exc:  # down: told before its next request (_ready), once back
                log.warning("weight sync to v%d: no answer (%s: %s); sent again once the server answers",
                            wanted, type(exc).__name__, exc)
                self.version = wanted
                for server in self.pool.servers:
                    server.version = None
                return
            except EngineError:  # refused: retried within max_retries, then the job fails with the reason
                self._send(lambda: self.engine.reload(self._sync, "", directory, wanted), f"weight sync to v{wanted}")
            self.version = wanted  # before _pushing is cleared: an answer in between reads one of the two
            for server in self.pool.servers:  # told: until one stops answering (mark_down forgets it)
                if server.forgotten == forgotten[server]:
                    server.version = wanted
        finally:
            self._pushing = None

    def _serves(self, server: Server) -> bool:
        if server.version is None:
            return False
        return server.version == self.version if self.exact else server.version >= self.version

    def _sync_server(self, server: Server) -> None:
        """Make ``server`` serve ``self.version`` (blocking: a job's thread or the loop's executor).
        Raises ``InferenceError`` (refused, within the bound) or a transport error (it is down)."""
        with server.sync_lock:
            if self.check_logprobs and server.version is None and server.refusal is None:
                if not logprobs_after_temperature(self._probe, server.root, self.model_name, PROBE_PROMPT):
                    server.refusal = (f"vLLM at {server.root} reports raw logprobs, not those of the tempered "
                                      "distribution it samples from: start it with --logprobs-mode processed_logprobs")
            if server.refusal is not None:
                raise EngineRefused(server.refusal)
            wanted = self.version
            if self._serves(server):
                return
            served = self.engine.served_version(self._probe, server.root)
            if not self._fits(served, wanted):
                with self.sync_lock(server.url):  # other workers may share it: read again, under the lock
                    served = self.engine.served_version(self._probe, server.root)
                    if not self._fits(served, wanted):
                        self._reload(server, wanted)
                        served = wanted
            server.version = served

    def _resync(self, server: Server) -> None:
        """openai: POST the current version to ``weight_sync_url`` for ``server``, which stopped
        answering since it was last told (blocking: the loop's executor). A transport error means
        it is still down: raised, so that the caller fails over or waits (``ServerPool``); a refusal
        is retried as any weight sync (``_send``).

        Why every dropped connection, not only an outage a probe saw: such a server cannot say what
        it serves, and a drop is all a worker may see of its restart (a process manager that keeps
        the port open, gunicorn-style, restarts a crashed worker process with no connection ever
        refused; a restart within the back-off before the next request looks the same). What is
        spared is only what is provably redundant: under ``_push_lock`` a load in flight ends first,
        so the resync sends the newest version, and none when that load's POST, sent after the drop,
        told the server already (before, an older version could land after the newer one)."""
        with server.sync_lock, self._push_lock:
            version = self.version
            if server.version == version:
                return
            log.info("%s stopped answering since it was sent v%d (a restarted server serves other weights): "
                     "sending it again before its next request", server.url, version)
            directory = weights.version_dir(self.weights_root, version).resolve()
            forgotten = server.forgotten
            try:
                self.engine.reload(self._sync, "", directory, version)
            except EngineError:
                self._send(lambda: self.engine.reload(self._sync, "", directory, version), f"weight sync to v{version}")
            if server.forgotten == forgotten:  # it stopped answering meanwhile: told again before its next request
                server.version = version

    def _fits(self, served: int | None, wanted: int) -> bool:
        return served is not None and (served == wanted if self.exact else served >= wanted)

    def _reload(self, server: Server, version: int) -> None:
        """One reload, a refused one retried within ``weight_sync_timeout``."""
        directory = weights.version_dir(self.weights_root, version).resolve()
        bound = self.cfg.weight_sync_timeout
        started = time.monotonic()
        deadline = started + bound
        for attempt in itertools.count():
            try:
                self.engine.reload(self._sync, server.root, directory, version,
                                   timeout=max(1.0, deadline - time.monotonic()))
                log.info("%s serves v%d (reloaded in %.2fs)", server.root, version, time.monotonic() - started)
                return
            except httpx.TimeoutException as exc:
                problem = f"no answer within the bound ({type(exc).__name__})"
            except EngineError as exc:
                problem = str(exc)
            delay = min(RELOAD_BACKOFF_S[0] * 2 ** attempt, RELOAD_BACKOFF_S[1])
            if time.monotonic() + delay >= deadline:
                raise InferenceError(
                    f"{server.root} did not load v{version} from {directory} within {bound:.0f}s "
                    f"(inference.weight_sync_timeout; {attempt + 1} attempts). The engine said: {problem}. Check that "
                    "the server sees the run's weights/ at that path (a shared volume) and its log") from None
            log.warning("%s refused v%d: %s; retry %d in %.1fs", server.root, version, problem, attempt + 1, delay)
            time.sleep(delay)

    async def _ready(self, server: Server) -> None:
        """Wait until ``server`` serves the wanted version: one sync per server at a time, in
        the loop's executor, shared by every draw that needs it."""
        if server.refusal is not None:
            raise EngineRefused(server.refusal)
        loop = asyncio.get_running_loop()
        if not self.engine.tracks_versions:
            # openai: the server cannot say what it serves. One that stopped answering may have
            # restarted with its base weights: send it the run's version again before it serves
            # (otherwise its samples would carry this version's stamp and the base model's logprobs).
            while self.engine.syncs and self.version > 0 and server.version != self.version:
                entry = server.shared.get("resync")
                if entry is None or entry[0] is not loop or entry[1].done():
                    entry = server.shared["resync"] = (loop, loop.run_in_executor(None, self._resync, server))
                await asyncio.shield(entry[1])
            return
        while not self._serves(server):
            entry = server.shared.get("sync")
            if entry is None or entry[0] is not loop or entry[1].done():
                entry = server.shared["sync"] = (loop, loop.run_in_executor(None, self._sync_server, server))
            await asyncio.shield(entry[1])

    async def _served_after(self, server: Server) -> int:
        """The version ``server`` reports in a read begun after this call. The read starts at
        the loop's next pass, so the draws whose answers came in this pass share it (one GET
        per round of answers, not per completion). It runs in the executor, not as a task: a
        task would belong to the job of the draw that started it and be cancelled with it
        (workers/sampling_loop.py), under the other jobs' draws awaiting it."""
        loop = asyncio.get_running_loop()
        entry = server.shared.get("version")
        if entry is None or entry[0] is not loop or entry[1]:
            result: asyncio.Future = loop.create_future()
            entry = server.shared["version"] = [loop, False, result]

            def start(entry: list = entry) -> None:
                entry[1] = True  # begun: a later caller needs a read of its own
                read = loop.run_in_executor(None, self.engine.served_version, self._sync, server.root)
                read.add_done_callback(lambda done: _settle(result, done))

            loop.call_soon(start)
        return await asyncio.shield(entry[2])

    async def _stamp(self, server: Server, before: int) -> tuple[int, int]:
        """(the oldest, the newest) version that may have answered: what was known before sending
        and what is read after the answer. A server that went back restarted; one that went
        forward was reloaded (by another worker or job) while the request was in flight, and
        either version may have computed it."""
        after = await self._served_after(server)
        if after < before:
            log.warning("%s now serves %s, v%d before this answer: it restarted with other weights; its samples are "
                        "stamped v%d and it is reloaded before its next request", server.root,
                        "another run's weights" if after < 0 else f"v{after}", before, max(0, after))
            if server.version == before:
                server.version = None
        return max(0, min(before, after)), max(before, after)

    async def complete(self, prompt: list[int], n: int, controller: Any = None, **sample_kwargs: Any
                       ) -> list[Completion]:
        body = completion_request(self.model_name, prompt, n, **sample_kwargs)
        controller = controller if controller is not None else self.controller
        failures = 0  # failed attempts (a server that does not answer at all is failed over, not counted)
        overloaded_since = None  # since when 429/503s ("come back later") came in a row: waited for, not counted
        refusals: dict[Server, int] = {}  # per server, its 429/503s in a row: its come-back backoff grows with them
        come_back: dict[Server, float] = {}  # per server that said "come back later" to this draw: from when
        # per server, requests it dropped in a row while believed up (its health probe answered, or no outage)
        dropped: dict[str, int] = {}
        while True:
            server = await self.pool.pick()
            if come_back:  # a server that asked this draw to come back later is not asked before then
                server, wait = next_to_ask(self.pool.order(), server, come_back, time.monotonic())
                if wait > 0:  # every server up asked to: wait for the first that may be asked again
                    await asyncio.sleep(wait)
                    come_back.pop(server, None)
                    continue
            was_up = server.up
            try:
                await self._ready(server)
                before = server.version if self.engine.tracks_versions else self.version
                result, payload = await self._attempt(server, body, controller)
                if isinstance(result, DOWN_ERRORS):
                    raise result
                dropped.clear()  # one answered
                if not server.up and isinstance(result, httpx.Response):  # it answers: without a health route
                    self.pool.mark_up(server)  # (openai) the request was its probe, and its outage is over
                if isinstance(result, httpx.Response) and result.status_code in OVERLOAD_STATUS:
                    now = time.monotonic()
                    overloaded_since = now if overloaded_since is None else overloaded_since
                    if now - overloaded_since < self.cfg.start_timeout:  # as a server that does not answer
                        asked = refusals.get(server, 0)
                        delay = come_back_after_s(result, asked)
                        refusals[server], come_back[server] = asked + 1, now + delay
                        # Another replica up that did not ask this draw to come back takes it at once (design
                        # §15.71 Engines sync through their own routes); only when every one up asked does
                        # the draw wait, for the first that may be asked again (a lone server: this one).
                        other, wait = next_to_ask(self.pool.order(), server, come_back, now)
                        pause = delay if other is server else wait
                        (log.debug if asked else log.warning)(
                            "completion: HTTP %d from %s (%s); %s, for up to %.0fs (inference.start_timeout)",
                            result.status_code, server.url, result.text[:200],
                            f"asking {other.url} meanwhile" if other is not server and pause <= 0 else
                            f"asking {'again' if other is server else other.url} in {pause:.1f}s",
                            self.cfg.start_timeout)
                        if other is server or pause > 0:
                            await asyncio.sleep(pause)
                            come_back.pop(other, None)  # waited for: asked next, not after a clock's rounding
                        continue
                else:
                    overloaded_since = None
                    refusals.pop(server, None)
                outcome = self._judge(result, "completion", failures, server.url)
                if isinstance(outcome, httpx.Response):
                    if self.engine.tracks_versions:
                        stamp, newest = await self._stamp(server, before)
                    else:  # openai: a push in flight, or one that ended while this was, may have computed it
                        pushing = self._pushing  # read first: a push that ends sets self.version before clearing it
                        stamp, newest = before, max(before, self.version, pushing if pushing is not None else 0)
                    stamps.record(stamp, newest)
                    return parse_completions(payload if payload is not None else outcome.json(), prompt, stamp)
            except httpx.TransportError as exc:  # it stopped answering: another server, or this one once back
                self.pool.mark_down(server, f"{type(exc).__name__}: {exc}")
                dropped[server.url] = dropped.get(server.url, 0) + was_up
                if dropped[server.url] <= 1:  # a server that just died (replicas that died together: each once)
                    continue
                # A server that answers its health probe yet drops every request would be probed, found up and
                # asked again forever (each probe clears its outage): from its second such drop in a row, each
                # counts as a failed attempt, so inference.max_retries ends it.
                outcome = self._judge(exc, "completion", failures, server.url)
            failures += 1
            await asyncio.sleep(outcome)

    async def _attempt(self, server: Server, body: dict[str, Any], controller: Any
                       ) -> tuple[httpx.Response | httpx.TransportError, dict[str, Any] | None]:
        """One request holding ``n`` slots of ``controller`` (one per completion it asks for),
        which is told how the server answered and how many tokens it generated; the back-off
        before a retry holds none (a shrunk window then applies). Returns the answer and, for
        a success, its parsed JSON (parsed once: it is counted here and read by the caller)."""
        n = body["n"]
        await controller.acquire(n)
        started, released = time.monotonic(), False
        payload = None
        try:
            try:
                result: httpx.Response | httpx.TransportError = await server.client().post("/completions", json=body)
            except httpx.TransportError as exc:
                result = exc
            latency, overloaded = _server_signal(result, time.monotonic() - started)
            if latency is not None:  # a success: the caller parses it anyway (a bad body raises there)
                with contextlib.suppress(ValueError):
                    payload = result.json()
            controller.release(latency, overloaded=overloaded, n=n, tokens=generated_tokens(payload))
            released = True
        finally:
            if not released:  # cancelled (the job's timeout) or a bug: never leak a slot
                controller.release(n=n)
        return result, payload

    def _send(self, request, what: str) -> None:
        for attempt in itertools.count():
            try:
                request()
                return
            except EngineError as exc:
                outcome = self._judge(exc.response, what, attempt, self.cfg.weight_sync_url or "")
            except httpx.TransportError as exc:
                outcome = self._judge(exc, what, attempt, self.cfg.weight_sync_url or "")
            if isinstance(outcome, httpx.Response):
                return
            time.sleep(outcome)

    def _judge(self, response: httpx.Response | httpx.TransportError, what: str,
               attempt: int, url: str) -> httpx.Response | float:
        """The response to use, or the seconds to wait before the next attempt; raises
        ``InferenceError`` when the request must not (or can no longer) be retried."""
        if isinstance(response, httpx.Response):
            if response.is_success:
                return response
            problem = f"HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code not in RETRY_STATUS:
                raise InferenceError(f"{what} failed at {response.request.url}: {problem}")
        else:
            problem = f"{type(response).__name__}: {response}"
        if attempt >= self.cfg.max_retries:
            raise InferenceError(f"{what} failed {attempt + 1} times against {url} ({problem}); "
                                 "check that the inference server is up and inference.base_url is right")
        delay = backoff_s(attempt)
        log.warning("%s: %s; retry %d of %d in %.1fs", what, problem, attempt + 1, self.cfg.max_retries, delay)
        return delay

    def close(self) -> None:
        """Close the blocking clients and each server's async client (on the loop it belongs
        to: ``Server.close_client``)."""
        self._sync.close()
        self._probe.close()
        for server in self.pool.servers:
            server.close_client()


def next_to_ask(order: list[Server], picked: Server, come_back: dict[Server, float],
                now: float) -> tuple[Server, float]:
    """(the server a draw asks next, seconds to wait first) when some asked it to come back later
    (``come_back``: server -> from when, after a 429/503). ``picked``, the pool's choice, unless it
    asked; else the first server in ``order`` (the pool's preference) that is up and did not ask,
    at once; else, when every one up asked, the one that may be asked first, after its wait."""
    if come_back.get(picked, now) <= now:
        return picked, 0.0
    asking = []
    for server in order:
        if server.up or server is picked:
            when = come_back.get(server, now)
            if when <= now:
                return server, 0.0
            asking.append((when, server.index, server))
    when, _, server = min(asking)
    return server, when - now


def backoff_s(attempt: int) -> float:
    """The wait before asking again after ``attempt`` + 1 tries: 0.5 s doubling, capped at 8 s."""
    return doubling_wait_s(attempt, BACKOFF_BASE_S, BACKOFF_CAP_S)


def come_back_after_s(response: httpx.Response, refusals: int) -> float:
    """The wait after a 429/503 that follows ``refusals`` others: the backoff, lengthened (never
    shortened) by the server's ``Retry-After``; a "0" or a date in the past (clock skew) would
    otherwise have the draw ask again at once, thousands of times a second."""
    return max(backoff_s(refusals), retry_after_s(response) or 0.0)


def retry_after_s(response: httpx.Response, cap: float = RETRY_AFTER_CAP_S) -> float | None:
    """The wait a 429/503 asks for (``Retry-After``: seconds, or an HTTP date), within [0, ``cap``];
    None when it asks for none or says something unreadable (a server's header is not trusted)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when is None or when.tzinfo is None:
            return None
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    return min(max(0.0, seconds), cap) if math.isfinite(seconds) else None


def _settle(target: asyncio.Future, source: asyncio.Future) -> None:
    """Give ``target`` the outcome of ``source`` (both of one loop)."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())
    else:
        target.set_result(source.result())


def generated_tokens(payload: Any) -> int:
    """The tokens a ``/completions`` answer generated, all its choices together: the server's
    ``usage.completion_tokens``, else its choices' token ids (or logprobs); 0 when it says
    neither (the concurrency window then judges latency per completion only). Never raises: a
    malformed answer is the parser's to report."""
    if not isinstance(payload, dict):
        return 0
    usage = payload.get("usage")
    reported = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if isinstance(reported, int) and not isinstance(reported, bool) and reported > 0:
        return reported
    choices = payload.get("choices")
    total = 0
    for choice in choices if isinstance(choices, list) else []:
        ids = choice.get("token_ids") if isinstance(choice, dict) else None
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        if ids is None and isinstance(logprobs, dict):
            ids = logprobs.get("token_logprobs")
        total += len(ids) if isinstance(ids, list) else 0
    return total


def _server_signal(result: httpx.Response | httpx.TransportError, latency_s: float) -> tuple[float | None, bool]:
    """(latency to learn from, overloaded) for a concurrency controller's ``release``."""
    if isinstance(result, httpx.TransportError):
        return None, True
    if result.status_code in OVERLOAD_STATUS:
        return None, True
    return (latency_s if result.is_success else None), False


class _Merged:
    """Draws of one prompt with the same sampling arguments that started in one loop pass: the
    first (the leader) sends them as one request of n = ``sum(counts)``; each other draw takes
    its slice of the answer."""

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int):
        self.counts = [n]
        self.answer: asyncio.Future = loop.create_future()
        self.span = stamps.VersionSpan()  # the versions that may have answered it, for every draw's group


def merge_key(prompt: list[int], kwargs: dict[str, Any]) -> tuple:
    """What two draws of one event loop must share to go out as one request: the prompt and every
    sampling argument."""
    return tuple(prompt), tuple(sorted((k, repr(v)) for k, v in kwargs.items()))


class RemoteSampler:
    """``setup.sampler`` over an inference server. Concurrent calls of different prompts are not
    merged here: the server batches them itself (continuous batching). Calls of one prompt with
    the same arguments made in one loop pass (a group's G rollouts of one row) are sent as one
    request with n = their number when ``inference.merge_requests`` is on (docs/design.md
    §15.74 One request per group): the server prefills the prompt once and sends one answer.
    ``concurrency_controller`` (rlstream.sampling.concurrency: ``AdaptiveConcurrencyController``
    or ``FixedConcurrencyController``) bounds the completions in flight; unset = the policy's (in a
    worker: one per process, chosen by ``workers.concurrency_control``)."""

    def __init__(self, policy: RemotePolicy, default_kwargs: dict[str, Any], concurrency_controller: Any = None):
        self.policy, self.default_kwargs = policy, default_kwargs
        self.concurrency_controller = concurrency_controller if concurrency_controller is not None \
            else policy.controller
        self.merge = policy.cfg.merge_requests
        self._gathering: dict[tuple, _Merged] = {}  # merge key -> the request its draws are joining

    async def sample_with_prompt_tokens(self, prompt_token_ids: list[int], n: int = 1,
                                        **kwargs: Any) -> list[Completion]:
        kw = {**self.default_kwargs, **kwargs}
        kw.pop("logprobs", None)  # always requested
        prompt = list(prompt_token_ids)
        if not self.merge:
            return await self._complete(prompt, n, kw)
        # The loop is part of the key: a sampler shared by threads (the SDK) merges within a loop only.
        key = (asyncio.get_running_loop(), *merge_key(prompt, kw))
        while key in self._gathering:
            merged = self._gathering[key]
            offset = sum(merged.counts)
            merged.counts.append(n)
            try:
                mine = (await asyncio.shield(merged.answer))[offset:offset + n]
            except asyncio.CancelledError:
                # The leader's job ended (a timeout cancels its tasks), not this draw's: draw again.
                if merged.answer.cancelled() and not asyncio.current_task().cancelling():
                    continue
                raise
            if (span := stamps.drawn_versions.get()) is not None:  # the answer's versions, in this draw's group
                span.add_span(merged.span)
            return mine
        return await self._lead(key, prompt, n, kw)

    async def _lead(self, key: tuple, prompt: list[int], n: int, kw: dict[str, Any]) -> list[Completion]:
        merged = self._gathering[key] = _Merged(asyncio.get_running_loop(), n)
        try:
            try:
                await asyncio.sleep(0)  # one loop pass: the other draws of the group start now and join
            finally:
                del self._gathering[key]
            total = sum(merged.counts)
            group_span = stamps.drawn_versions.set(merged.span)  # the answer's stamps, shared with the followers
            try:
                completions = await self._complete(prompt, total, kw)
            finally:
                stamps.drawn_versions.reset(group_span)
                if (span := stamps.drawn_versions.get()) is not None:
                    span.add_span(merged.span)
            if len(completions) != total:
                raise InferenceError(f"asked the inference server for n={total} completions of one prompt, it "
                                     f"returned {len(completions)}; set inference.merge_requests = false for a "
                                     "server that ignores n")
        except BaseException as exc:
            if len(merged.counts) > 1:  # a lone draw's future is never awaited: leave it unset
                if isinstance(exc, asyncio.CancelledError):
                    merged.answer.cancel()  # the followers draw again
                else:
                    merged.answer.set_exception(exc)
            raise
        if len(merged.counts) > 1:
            merged.answer.set_result(completions)
        return completions[:n]

    async def _complete(self, prompt: list[int], n: int, kw: dict[str, Any]) -> list[Completion]:
        return await self.policy.complete(prompt, n, controller=self.concurrency_controller, **kw)

    async def sample_with_tokens(self, messages: list[dict[str, Any]], n: int = 1, **kwargs: Any) -> list[Completion]:
        return await self.sample_with_prompt_tokens(chat_prompt_ids(self.policy.tokenizer, messages), n=n, **kwargs)
