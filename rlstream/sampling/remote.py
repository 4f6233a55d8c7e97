"""Sampling from an OpenAI-compatible inference server over httpx (``inference.backend =
"openai"``): vLLM, SGLang or anything that serves ``POST {base_url}/completions``.

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

Weight sync is pull-based as everywhere in rlstream: when a newer ``WeightsPublished``
appears, the worker POSTs ``{"model_path": <run dir>/weights/v<N>, "version": N}`` to
``inference.weight_sync_url`` (SGLang's ``/update_weights_from_disk`` takes exactly this)
and stamps samples with N once the server said 2xx. The server must see the trainer's
weights directory (a shared volume) at the path the worker sees. The path is derived from
the worker's own run directory, never taken from the event (Redis is not trusted with
paths). Without a sync URL the server is never told, samples
are stamped with the version the worker last synced (0), and the trainer's offsets show it.

Retries only here, at the I/O edge: connection errors, timeouts, 429 and 5xx are retried
``max_retries`` times with exponential backoff; any other 4xx fails at once with the
server's message.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx

from rlstream.core import weights
from rlstream.core.config import InferenceConfig
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import WeightsPublished
from rlstream.core.rollout import NO_LIMIT, Completion, chat_prompt_ids, no_room, token_budget
from rlstream.sampling.concurrency import FixedConcurrencyController

log = logging.getLogger(__name__)
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.5, 8.0
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
OVERLOAD_STATUS = frozenset({429, 503})  # the server asks for less: the concurrency window shrinks at once


class InferenceError(RlstreamError):
    """The inference server refused or kept failing a request."""


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


class RemotePolicy:
    """The worker's view of one inference server: the version it serves, its tokenizer
    (loaded from the published weights directory), and the HTTP clients."""

    def __init__(self, cfg: InferenceConfig, published: WeightsPublished, tokenizer: Any, model_name: str,
                 weights_root: str | Path, transport: httpx.AsyncBaseTransport | None = None,
                 sync_transport: httpx.BaseTransport | None = None, controller: Any = None):
        """``controller``: the concurrency controller every request goes through
        (rlstream.sampling.concurrency); unset = a fixed window of ``max_concurrency``."""
        self.cfg, self.tokenizer, self.model_name = cfg, tokenizer, model_name
        self.weights_root = Path(weights_root)  # the run's weights/: version N is <weights_root>/v<N>
        headers = _headers(cfg)
        self._client = httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), timeout=cfg.timeout, headers=headers,
                                         transport=transport)
        self._sync = httpx.Client(timeout=cfg.timeout, headers=headers, transport=sync_transport)
        self.controller = controller if controller is not None else FixedConcurrencyController(cfg.max_concurrency)
        self.version = 0  # what the server is known to serve: the base model until a sync succeeds
        self.load(published)

    def load(self, published: WeightsPublished) -> None:
        """Tell the server to serve ``published`` (bounded retries), then stamp with it."""
        if self.cfg.weight_sync_url is None or published.version <= self.version:
            return
        directory = weights.version_dir(self.weights_root, published.version).resolve()
        payload = {"model_path": str(directory), "version": published.version}
        self._send(lambda: self._sync.post(self.cfg.weight_sync_url, json=payload),
                   f"weight sync to v{published.version}")
        self.version = published.version

    async def complete(self, prompt: list[int], n: int, controller: Any = None, **sample_kwargs: Any
                       ) -> list[Completion]:
        body = completion_request(self.model_name, prompt, n, **sample_kwargs)
        version = self.version
        response = await self._asend(lambda: self._client.post("/completions", json=body), "completion",
                                     controller if controller is not None else self.controller)
        return parse_completions(response.json(), prompt, version)

    def _send(self, request, what: str) -> httpx.Response:
        for attempt in itertools.count():
            try:
                outcome = self._judge(request(), what, attempt)
            except httpx.TransportError as exc:
                outcome = self._judge(exc, what, attempt)
            if isinstance(outcome, httpx.Response):
                return outcome
            time.sleep(outcome)

    async def _asend(self, request, what: str, controller: Any) -> httpx.Response:
        """Each attempt holds one slot of ``controller`` and tells it how the server
        answered; the back-off before a retry holds none (a shrunk window then applies)."""
        for attempt in itertools.count():
            await controller.acquire()
            started, released = time.monotonic(), False
            try:
                try:
                    result: httpx.Response | httpx.TransportError = await request()
                except httpx.TransportError as exc:
                    result = exc
                latency, overloaded = _server_signal(result, time.monotonic() - started)
                controller.release(latency, overloaded=overloaded)
                released = True
            finally:
                if not released:  # cancelled (the job's timeout) or a bug: never leak a slot
                    controller.release()
            outcome = self._judge(result, what, attempt)
            if isinstance(outcome, httpx.Response):
                return outcome
            await asyncio.sleep(outcome)

    def _judge(self, response: httpx.Response | httpx.TransportError, what: str,
               attempt: int) -> httpx.Response | float:
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
            raise InferenceError(f"{what} failed {attempt + 1} times against {self.cfg.base_url} ({problem}); "
                                 "check that the inference server is up and inference.base_url is right")
        delay = min(BACKOFF_BASE_S * 2 ** attempt, BACKOFF_CAP_S)
        log.warning("%s: %s; retry %d of %d in %.1fs", what, problem, attempt + 1, self.cfg.max_retries, delay)
        return delay


def _server_signal(result: httpx.Response | httpx.TransportError, latency_s: float) -> tuple[float | None, bool]:
    """(latency to learn from, overloaded) for a concurrency controller's ``release``."""
    if isinstance(result, httpx.TransportError):
        return None, True
    if result.status_code in OVERLOAD_STATUS:
        return None, True
    return (latency_s if result.is_success else None), False


class RemoteSampler:
    """``setup.sampler`` over an inference server. Concurrent calls are not merged here:
    the server batches them itself (continuous batching). ``concurrency_controller``
    (rlstream.sampling.concurrency: ``AdaptiveConcurrencyController`` or
    ``FixedConcurrencyController``) bounds the requests in flight; unset = the policy's
    (in a worker: one per process, chosen by ``workers.concurrency_control``)."""

    def __init__(self, policy: RemotePolicy, default_kwargs: dict[str, Any], concurrency_controller: Any = None):
        self.policy, self.default_kwargs = policy, default_kwargs
        self.concurrency_controller = concurrency_controller if concurrency_controller is not None \
            else policy.controller

    async def sample_with_prompt_tokens(self, prompt_token_ids: list[int], n: int = 1,
                                        **kwargs: Any) -> list[Completion]:
        kw = {**self.default_kwargs, **kwargs}
        kw.pop("logprobs", None)  # always requested
        return await self.policy.complete(list(prompt_token_ids), n, controller=self.concurrency_controller, **kw)

    async def sample_with_tokens(self, messages: list[dict[str, Any]], n: int = 1, **kwargs: Any) -> list[Completion]:
        return await self.sample_with_prompt_tokens(chat_prompt_ids(self.policy.tokenizer, messages), n=n, **kwargs)
