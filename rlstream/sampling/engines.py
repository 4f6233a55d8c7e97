"""What rlstream says to an inference engine over HTTP, beside sampling: load a version of the
weights (``reload``), which version it serves (``served_version``), is it up (``healthy``), is it
fit for the run (``check_server``, ``logprobs_after_temperature``). One small class per
``inference.backend``; ``engine_for(backend)`` picks it.

Every call here is one attempt: retries, their bound and the choice of server are the caller's
(rlstream.sampling.remote, rlstream.sampling.servers). ``root`` is a server's root URL, its
``inference.base_url`` without the ``/v1`` (``server_root``): vLLM and SGLang serve their own
routes there. The routes, as measured against vLLM 0.32 and read in SGLang 0.5.23's source
(docs/design.md §15.71 Engines sync through their own routes):

- vLLM, started with ``VLLM_SERVER_DEV_MODE=1`` (which adds /collective_rpc and
  /reset_prefix_cache): POST /pause?mode=wait, /collective_rpc {"method": "reload_weights",
  "kwargs": {"weights_path": DIR}}, /reset_prefix_cache, /update_weight_version {"new_version":
  LABEL}, /resume; GET /weight_info -> {"weight_version": LABEL} ("default" on a fresh server).
- SGLang: POST /update_weights_from_disk {"model_path": DIR, "weight_version": LABEL} (its
  UpdateWeightFromDiskReqInput), 400 {"success": false, "message": ...} when refused; GET
  /model_info -> {"weight_version": LABEL, ...}.
- any other OpenAI-compatible server ("openai"): POST ``inference.weight_sync_url``
  {"model_path": DIR, "version": N} (rlstream's generic contract); no version to read back.

A version's LABEL on the server is ``<namespace>:<N>`` (the namespace is the run id), or ``N``
without one: a server still serving another run's weights (same N, other weights) is then read
as ``FOREIGN``, behind every version of this run, and reloaded before use, never adopted.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx

from rlstream.core.config import MAX_SEQ_LEN_LIMIT
from rlstream.core.errors import RlstreamError

log = logging.getLogger(__name__)
FOREIGN = -1  # served_version of weights labelled by another run (or by hand): behind every version
BASE_LABELS = frozenset({"", "default", "none"})  # a server that was never reloaded: the base weights, v0
VLLM_DEV_ROUTES = ("/collective_rpc", "/reset_prefix_cache")  # only with VLLM_SERVER_DEV_MODE=1
VLLM_ROUTES = ("/pause", "/resume", "/update_weight_version", "/weight_info")
PROBE_TEMPERATURE = 0.25
RESUME_ATTEMPTS = 3
RESUME_TIMEOUT_S = 10.0  # each resume gets at least this, past a reload's bound too: paused, vLLM hangs every request
_clock = time.monotonic


class InferenceError(RlstreamError):
    """The inference server refused or kept failing a request."""


class EngineError(InferenceError):
    """The engine answered a weight-sync call with an error (its message is in the text)."""

    def __init__(self, message: str, response: httpx.Response | None = None):
        super().__init__(message)
        self.response = response


class EngineRefused(InferenceError):
    """A server unfit for the run: the reason and what to change are in the text."""


def server_root(base_url: str) -> str:
    """``http://host:8000/v1`` -> ``http://host:8000``: where vLLM and SGLang serve their own routes."""
    return base_url.rstrip("/").removesuffix("/v1")


def _message(response: httpx.Response) -> str:
    """The engine's own words: vLLM's {"error": {"message"}}, SGLang's {"message"}, else the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
        if body.get("message"):
            return str(body["message"])[:500]
    return response.text[:500]


def _expect(response: httpx.Response, what: str) -> httpx.Response:
    if not response.is_success:
        raise EngineError(f"{what} at {response.request.url}: HTTP {response.status_code}: {_message(response)}",
                          response)
    return response


class Engine:
    """``openai``: a generic OpenAI-compatible server, told of a version by a POST to
    ``weight_sync_url`` (never, when unset); it reports no version."""

    name = "openai"
    tracks_versions = False  # the server says which version it serves (vllm, sglang)

    def __init__(self, weight_sync_url: str | None = None, namespace: str = ""):
        self.weight_sync_url, self.namespace = weight_sync_url, namespace

    @property
    def syncs(self) -> bool:
        """Whether this engine can be told to load a version at all."""
        return self.tracks_versions or self.weight_sync_url is not None

    def label(self, version: int) -> str:
        return f"{self.namespace}:{version}" if self.namespace else str(version)

    def parse_label(self, label: Any) -> int:
        """A served label -> the version: the base weights (never reloaded) are v0; another
        namespace's, or anything unreadable, ``FOREIGN``."""
        text = "" if label is None else str(label).strip()
        if text.lower() in BASE_LABELS:
            return 0
        prefix = f"{self.namespace}:" if self.namespace else ""
        number = text.removeprefix(prefix) if text.startswith(prefix) else None
        return int(number) if number is not None and number.isdigit() else FOREIGN

    def reload(self, client: httpx.Client, root: str, directory: Path, version: int, *,
               timeout: float | None = None) -> None:
        """One attempt at making the server serve ``directory`` as ``version``, all of its HTTP
        calls within ``timeout`` seconds; raises ``EngineError`` (the engine refused) or httpx's
        transport errors."""
        if self.weight_sync_url is None:
            return
        _expect(client.post(self.weight_sync_url, json={"model_path": str(directory), "version": version},
                            **_Budget(timeout).left()), f"weight sync to v{version}")

    def version_url(self, root: str) -> str | None:
        return None

    def read_version(self, response: httpx.Response) -> int:
        raise NotImplementedError

    def served_version(self, client: httpx.Client, root: str) -> int | None:
        """The version the server serves (``FOREIGN`` for another run's), None when it cannot say."""
        url = self.version_url(root)
        return None if url is None else self.read_version(_expect(client.get(url), "reading the served version"))

    def serves_base(self, client: httpx.Client, root: str) -> bool:
        """Whether the server still carries the label of a start (never reloaded, never labelled):
        not the same as ``served_version`` 0, which a reload of v0 also reports."""
        url = self.version_url(root)
        if url is None:
            return False
        label = _expect(client.get(url), "reading the served version").json().get("weight_version")
        return ("" if label is None else str(label).strip()).lower() in BASE_LABELS


    def missing_routes(self, paths: set[str]) -> str | None:
        """Why a server with these routes cannot be synced, with the fix; None when it can."""
        return None


class VllmEngine(Engine):
    name = "vllm"
    tracks_versions = True

    def reload(self, client: httpx.Client, root: str, directory: Path, version: int, *,
               timeout: float | None = None) -> None:
        """Pause (waiting for requests in flight), reload from ``directory``, drop the prefix
        cache (its KV was computed with the old weights), label, and resume, also after a
        failure, the pause's own included: a client that gave up waiting for ``mode=wait``
        leaves vLLM pausing anyway, and a paused server would hang every worker's requests.
        Each call gets what is left of ``timeout``."""
        budget = _Budget(timeout)
        failed = True
        try:
            _expect(client.post(f"{root}/pause", params={"mode": "wait"}, **budget.left()), "pausing vLLM")
            _expect(client.post(f"{root}/collective_rpc", json={"method": "reload_weights", "kwargs": {
                "weights_path": str(directory)}}, **budget.left()), f"reloading v{version} from {directory}")
            _expect(client.post(f"{root}/reset_prefix_cache", **budget.left()), "resetting vLLM's prefix cache")
            _expect(client.post(f"{root}/update_weight_version", json={"new_version": self.label(version)},
                                **budget.left()), "labelling the weights")
            failed = False
        finally:
            self._resume(client, root, budget, quiet=failed)  # the reload's own error matters more

    @staticmethod
    def _resume(client: httpx.Client, root: str, budget: _Budget, quiet: bool) -> None:
        """POST /resume, retried: after a failed call vLLM may close the connection, and the
        first resume sent on it is reset (measured on vLLM 0.32)."""
        problem: Exception | None = None
        for _ in range(RESUME_ATTEMPTS):
            try:
                _expect(client.post(f"{root}/resume", **budget.left(at_least=RESUME_TIMEOUT_S)), "resuming vLLM")
                return
            except (httpx.TransportError, EngineError) as exc:
                problem = exc
        message = (f"vLLM at {root} stays paused: {RESUME_ATTEMPTS} resumes failed ({problem}); POST {root}/resume "
                   "or restart it")
        if quiet:
            log.error(message)
        else:
            raise EngineError(message)

    def version_url(self, root: str) -> str:
        return f"{root}/weight_info"

    def read_version(self, response: httpx.Response) -> int:
        return self.parse_label(response.json().get("weight_version"))

    def missing_routes(self, paths: set[str]) -> str | None:
        dev = [p for p in VLLM_DEV_ROUTES if p not in paths]
        if dev:
            return (f"vLLM at this URL has no {', '.join(dev)}: start it with the environment variable "
                    "VLLM_SERVER_DEV_MODE=1 (rlstream reloads weights through those routes)")
        other = [p for p in VLLM_ROUTES if p not in paths]
        if other:
            return f"vLLM at this URL has no {', '.join(other)}: use vLLM 0.32 or newer"
        return None


class SglangEngine(Engine):
    name = "sglang"
    tracks_versions = True

    def reload(self, client: httpx.Client, root: str, directory: Path, version: int, *,
               timeout: float | None = None) -> None:
        """SGLang waits for the requests in flight and flushes its cache itself (flush_cache's default)."""
        _expect(client.post(f"{root}/update_weights_from_disk",
                            json={"model_path": str(directory), "weight_version": self.label(version)},
                            **_Budget(timeout).left()), f"reloading v{version} from {directory}")

    def version_url(self, root: str) -> str:
        return f"{root}/model_info"

    def read_version(self, response: httpx.Response) -> int:
        return self.parse_label(response.json().get("weight_version"))

    def missing_routes(self, paths: set[str]) -> str | None:
        if "/update_weights_from_disk" not in paths:
            return "SGLang at this URL has no /update_weights_from_disk: use SGLang 0.5 or newer"
        return None


ENGINES = {"openai": Engine, "vllm": VllmEngine, "sglang": SglangEngine}


def engine_for(backend: str, *, weight_sync_url: str | None = None, namespace: str = "") -> Engine:
    """The engine of ``inference.backend`` (not "local": that one samples in the worker)."""
    if backend not in ENGINES:
        raise ValueError(f"no inference engine {backend!r}: use one of {', '.join(ENGINES)}")
    return ENGINES[backend](weight_sync_url=weight_sync_url, namespace=namespace)


class _Budget:
    """What is left of one reload attempt's ``timeout`` (None: the client's own), as the
    keyword arguments of its next HTTP call."""

    MIN_CALL_S = 1.0  # a call past the bound still gets this much: it fails as a timeout, not at once

    def __init__(self, timeout: float | None):
        self.deadline = None if timeout is None else _clock() + timeout

    def left(self, at_least: float = MIN_CALL_S) -> dict[str, Any]:
        if self.deadline is None:
            return {}
        return {"timeout": max(at_least, self.deadline - _clock())}


def healthy(client: httpx.Client, root: str) -> bool:
    """One ``GET /health`` (bounded by the client's timeout): True on 200; never raises."""
    try:
        return client.get(f"{root}/health").status_code == 200
    except httpx.HTTPError:
        return False


def _json(response: httpx.Response, root: str) -> dict[str, Any]:
    """A check's answer as a JSON object, or a refusal saying what answered instead."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise EngineRefused(f"{response.request.url} answered something that is not a JSON object "
                            f"({response.text[:200]!r}): is {root} a vllm or sglang server (inference.base_url)?")
    return body


def check_server(client: httpx.Client, root: str, *, backend: str, model_name: str, max_seq_len: int) -> None:
    """Refuse (``EngineRefused``, naming the reason and the flag to change) a vllm or sglang
    server that cannot be synced, serves another model than ``model_name``, or holds fewer
    tokens than ``max_seq_len``. A generic ("openai") server is not checked."""
    engine = engine_for(backend)
    if not engine.tracks_versions:
        return
    try:
        routes = client.get(f"{root}/openapi.json")
        models = client.get(f"{root}/v1/models")
    except httpx.TransportError as exc:
        raise EngineRefused(f"the {backend} server at {root} did not answer ({type(exc).__name__}: {exc}): is it up? "
                            "is inference.base_url right?") from None
    if routes.status_code == 200:  # a server that hides its route list is judged by its first reload
        problem = engine.missing_routes(set((_json(routes, root).get("paths") or {}).keys()))
        if problem:
            raise EngineRefused(f"{root}: {problem}")
    else:
        log.info("%s lists no routes (GET /openapi.json: HTTP %d): its reload routes are checked by the first reload",
                 root, routes.status_code)
    if not models.is_success:
        raise EngineRefused(f"{root}/v1/models answered HTTP {models.status_code}: {_message(models)}; is "
                            f"inference.base_url the {backend} server's /v1?")
    served = [m for m in _json(models, root).get("data") or [] if isinstance(m, dict)]
    names = [str(m.get("id")) for m in served]
    if model_name not in names:
        raise EngineRefused(f"{root} serves {', '.join(names) or 'no model'}, not {model_name!r}: start it with "
                            f"--served-model-name {model_name} or set inference.model to the name it serves")
    limit = next(m.get("max_model_len") for m in served if str(m.get("id")) == model_name)
    if isinstance(limit, int) and limit < max_seq_len < MAX_SEQ_LEN_LIMIT:  # the top value is "no limit"
        flag = "--context-length" if backend == "sglang" else "--max-model-len"
        raise EngineRefused(f"{root} holds {limit} tokens per sequence, under max_seq_len {max_seq_len}: start it "
                            f"with {flag} {max_seq_len} (or more), or lower max_seq_len")


def _top_logprobs(client: httpx.Client, root: str, model_name: str, prompt_ids: list[int],
                  temperature: float) -> dict[str, float]:
    body = {"model": model_name, "prompt": list(prompt_ids), "max_tokens": 1, "temperature": temperature,
            "logprobs": 5, "n": 1}
    response = _expect(client.post(f"{root}/v1/completions", json=body), "the logprobs probe")
    top = ((response.json()["choices"][0].get("logprobs") or {}).get("top_logprobs") or [None])[0]
    if not isinstance(top, dict) or not top:
        raise EngineRefused(f"{root} returned no top logprobs for the logprobs probe (request field logprobs=5)")
    return {str(k): float(v) for k, v in top.items()}


def logprobs_after_temperature(client: httpx.Client, root: str, model_name: str, prompt_ids: list[int]) -> bool:
    """Whether the server's logprobs are those of the tempered distribution the tokens are
    drawn from: the top logprobs of one next token at temperature 0.25 and 1.0 are equal when
    they are raw (vLLM's default ``--logprobs-mode raw_logprobs``)."""
    cold = _top_logprobs(client, root, model_name, prompt_ids, PROBE_TEMPERATURE)
    warm = _top_logprobs(client, root, model_name, prompt_ids, 1.0)
    common = cold.keys() & warm.keys()
    if not common:  # the top tokens moved: the distribution changed with temperature
        return True
    return max(abs(cold[t] - warm[t]) for t in common) > 1e-4
