"""The OpenAI-compatible sampler against ``httpx.MockTransport`` (the seam): request body,
both token-id conventions, retries with backoff at the edge, refusals, weight sync."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from rlstream.core.config import Config, InferenceConfig
from rlstream.core.messages import WeightsPublished
from rlstream.sampling import remote as remote_policy
from rlstream.sampling.remote import InferenceError, RemotePolicy, RemoteSampler, completion_request, parse_completions

PROMPT = [3, 4, 5]


class FakeTokenizer:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        return {"input_ids": [len(m["content"]) for m in messages] + [99]}


def published(version: int, uri: str = "/attacker/chosen") -> WeightsPublished:
    """The event's uri is never used: the path POSTed is the worker's own run dir's."""
    return WeightsPublished(version=version, uri=f"{uri}/v{version}", sha256="0" * 64, bytes=1)


def choice(index: int, ids: list[int], logprobs: list[float], reason: str = "stop", as_strings: bool = False) -> dict:
    tokens = [f"token_id:{t}" for t in ids] if as_strings else [f"<{t}>" for t in ids]
    out = {"index": index, "text": "".join(f"<{t}>" for t in ids), "finish_reason": reason,
           "logprobs": {"tokens": tokens, "token_logprobs": logprobs}}
    if not as_strings:
        out["token_ids"] = ids
    return out


@pytest.fixture(autouse=True)
def no_backoff_sleep(monkeypatch):
    monkeypatch.setattr(remote_policy, "BACKOFF_BASE_S", 0.0)


def make_policy(handler, *, sync_handler=None, version: int = 0, **inference) -> RemotePolicy:
    cfg = InferenceConfig(backend="openai", base_url="http://inference.test/v1", **inference)
    sync = httpx.MockTransport(sync_handler or (lambda request: httpx.Response(500)))
    return RemotePolicy(cfg, published(version), FakeTokenizer(), "my-model", Path("/shared/weights"),
                        transport=httpx.MockTransport(handler), sync_transport=sync)


def test_request_body_sends_token_ids_and_turns_top_k_off():
    body = completion_request("m", PROMPT, 4, max_tokens=16, temperature=0.7, top_p=1.0, top_k=0, max_seq_len=10)
    assert body == {"model": "m", "prompt": [3, 4, 5], "n": 4, "max_tokens": 7, "temperature": 0.7, "top_p": 1.0,
                    "top_k": -1, "logprobs": 0, "echo": False, "return_token_ids": True,
                    "return_tokens_as_token_ids": True, "skip_special_tokens": False}
    with pytest.raises(ValueError, match="no room under max_seq_len 3"):
        completion_request("m", PROMPT, 1, max_tokens=4, temperature=1.0, max_seq_len=3)


def test_parse_both_token_id_conventions_in_choice_order():
    body = {"choices": [choice(1, [7], [-0.5], "length", as_strings=True), choice(0, [8, 2], [-0.1, -0.2])]}
    first, second = parse_completions(body, PROMPT, version=3)
    assert first.full_tokens == [3, 4, 5, 8, 2] and first.prompt_len == 3
    assert first.inference_logprobs == [-0.1, -0.2] and first.finish_reason == "stop" and first.version == 3
    assert second.output_tokens == [7] and second.finish_reason == "length" and second.text == "<7>"


def test_parse_refuses_text_only_and_mismatched_logprobs():
    text_only = {"choices": [{"index": 0, "text": "7", "finish_reason": "stop",
                              "logprobs": {"tokens": ["7"], "token_logprobs": [-0.3]}}]}
    with pytest.raises(InferenceError, match="no generated token ids"):
        parse_completions(text_only, PROMPT, 0)
    with pytest.raises(InferenceError, match="2 token ids but 1 logprobs"):
        parse_completions({"choices": [choice(0, [1, 2], [-0.3])]}, PROMPT, 0)


def test_sampler_posts_completions_and_returns_completions():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content)))
        body = json.loads(request.content)
        return httpx.Response(200, json={"choices": [choice(i, [9, i], [-1.0, -2.0]) for i in range(body["n"])]})

    policy = make_policy(handler)
    sampler = RemoteSampler(policy, Config().sample_kwargs())
    out = asyncio.run(sampler.sample_with_prompt_tokens(PROMPT, n=2, temperature=0.5))
    assert [c.output_tokens for c in out] == [[9, 0], [9, 1]]
    path, body = seen[0]
    assert path == "/v1/completions" and body["n"] == 2 and body["temperature"] == 0.5 and body["model"] == "my-model"
    assert "logprobs" in body and body["logprobs"] == 0  # not the sample_kwargs' logprobs=True
    chat = asyncio.run(sampler.sample_with_tokens(messages=[{"role": "user", "content": "ab"}]))
    assert seen[-1][1]["prompt"] == [2, 99] and chat[0].prompt_len == 2


def test_retries_5xx_and_connection_errors_then_succeeds():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        if len(calls) == 2:
            return httpx.Response(503, text="loading")
        return httpx.Response(200, json={"choices": [choice(0, [1], [-0.1])]})

    out = asyncio.run(make_policy(handler, max_retries=2).complete(PROMPT, 1, max_tokens=1, temperature=1.0))
    assert len(calls) == 3 and out[0].output_tokens == [1]


def test_gives_up_after_the_bound_with_what_to_do():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(502, text="bad gateway")

    with pytest.raises(InferenceError, match=r"failed 3 times .*HTTP 502.*inference.base_url"):
        asyncio.run(make_policy(handler, max_retries=2).complete(PROMPT, 1, max_tokens=1, temperature=1.0))
    assert len(calls) == 3


def test_client_error_is_not_retried():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json={"error": "model my-model not found"})

    with pytest.raises(InferenceError, match="HTTP 400.*not found"):
        asyncio.run(make_policy(handler).complete(PROMPT, 1, max_tokens=1, temperature=1.0))
    assert len(calls) == 1


def test_weight_sync_posts_path_and_stamps_only_after_success():
    posted = []

    def sync(request: httpx.Request) -> httpx.Response:
        posted.append((str(request.url), json.loads(request.content)))
        return httpx.Response(503) if len(posted) == 2 else httpx.Response(200, json={"success": True})

    url = "http://inference.test/update_weights_from_disk"
    policy = make_policy(lambda r: httpx.Response(500), sync_handler=sync, weight_sync_url=url, max_retries=1)
    assert policy.version == 0 and posted == []  # v0 is what the server was started with
    policy.load(published(2))
    assert policy.version == 2 and posted[0] == (url, {"model_path": "/shared/weights/v2", "version": 2})
    policy.load(published(3))  # 503 once, then 200
    assert policy.version == 3 and len(posted) == 3
    policy.load(published(3))  # already there: nothing sent
    assert len(posted) == 3


def test_failed_weight_sync_keeps_the_old_stamp():
    policy = make_policy(lambda r: httpx.Response(500), sync_handler=lambda r: httpx.Response(404),
                         weight_sync_url="http://inference.test/update")
    with pytest.raises(InferenceError, match="weight sync to v1 failed.*HTTP 404"):
        policy.load(published(1))
    assert policy.version == 0


def test_without_sync_url_samples_keep_the_base_version():
    policy = make_policy(lambda r: httpx.Response(500))
    policy.load(published(5))
    assert policy.version == 0


def test_api_key_comes_from_the_named_environment_variable(monkeypatch):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"choices": [choice(0, [1], [-0.1])]})

    with pytest.raises(InferenceError, match="RL_TEST_KEY, which is not set"):
        make_policy(handler, api_key_env="RL_TEST_KEY")
    monkeypatch.setenv("RL_TEST_KEY", "s3cret")
    asyncio.run(make_policy(handler, api_key_env="RL_TEST_KEY").complete(PROMPT, 1, max_tokens=1, temperature=1.0))
    assert seen == ["Bearer s3cret"]


def test_config_requires_base_url_for_the_openai_backend():
    from rlstream.core.config import validate_config
    from rlstream.core.errors import ConfigError

    with pytest.raises(ConfigError, match="inference: backend 'openai' needs base_url"):
        validate_config({"inference": {"backend": "openai"}})
    with pytest.raises(ConfigError, match="inference.base_url"):
        validate_config({"inference": {"backend": "openai", "base_url": "localhost:8000"}})
