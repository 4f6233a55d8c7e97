"""The OpenAI-compatible sampler against ``httpx.MockTransport`` (the seam): request body,
both token-id conventions, retries with backoff at the edge, refusals, weight sync."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
from factories import legacy_config

from rlstream.core.config import InferenceConfig
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
    sampler = RemoteSampler(policy, legacy_config().sample_kwargs())
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


# ----------------------------------------------------------------- vllm / sglang: sync, stamps, replicas
from engine_standins import FakeSglang, FakeVllm, Servers  # noqa: E402

from rlstream.sampling import servers as server_pool  # noqa: E402
from rlstream.sampling.engines import EngineRefused  # noqa: E402
from rlstream.sampling.stamps import VersionSpan, drawn_versions  # noqa: E402

WEIGHTS = Path("/shared/runs/run/weights")


@pytest.fixture
def quick_reload_retries(monkeypatch):
    monkeypatch.setattr(remote_policy, "RELOAD_BACKOFF_S", (0.01, 0.02))


def engine_policy(handler, backend: str = "vllm", urls=("http://a.test/v1",), version: int = 0,
                  **kwargs) -> RemotePolicy:
    inference = {k: kwargs.pop(k) for k in list(kwargs) if k in InferenceConfig.model_fields}
    cfg = InferenceConfig(backend=backend, base_url=list(urls), **inference)
    transport = httpx.MockTransport(handler)
    return RemotePolicy(cfg, published(version), FakeTokenizer(), "m", WEIGHTS, transport=transport,
                        sync_transport=transport, namespace="run", **kwargs)


def draw(policy: RemotePolicy, span: VersionSpan | None = None):
    async def one():
        drawn_versions.set(span)
        return (await policy.complete(PROMPT, 1, max_tokens=1, temperature=1.0))[0]

    return asyncio.run(one())


@pytest.mark.parametrize("engine", [FakeVllm, FakeSglang])
def test_load_syncs_the_server_and_stamps_what_it_serves(engine):
    server = engine()
    policy = engine_policy(server, backend=engine.__name__.removeprefix("Fake").lower())
    assert draw(policy).version == 0 and server.reloads == []  # a fresh server serves the base: v0, no reload
    policy.load(published(2))
    assert server.reloads == [str(WEIGHTS / "v2")] and server.label == "run:2"
    assert draw(policy).version == 2 and server.completions[-1] == str(WEIGHTS / "v2")
    policy.load(published(2))
    assert len(server.reloads) == 1


def test_two_workers_sharing_a_server_reload_it_once_per_version(r):
    """Each worker process has its own RemotePolicy; the Redis lock (fakeredis) makes the
    second one find the version loaded by the first and adopt it."""
    import threading

    vllm = FakeVllm()
    both_read = threading.Barrier(2, timeout=10)
    other_read_again = threading.Event()
    reads = []

    def handler(request):
        """Both workers find the server behind before either reloads, and the first reload
        lasts until the other worker reads again (or 0.5 s): without the lock, that read
        finds it still behind and the other worker reloads too."""
        if request.url.path == "/weight_info" and threading.current_thread() is not threading.main_thread():
            reads.append(1)
            if len(reads) <= 2:
                both_read.wait()
            elif len(reads) >= 4:
                other_read_again.set()
        if request.url.path == "/collective_rpc" and not vllm.reloads:
            other_read_again.wait(timeout=0.5)
        return vllm(request)

    lock = remote_policy.redis_sync_lock(r, "run", timeout=30.0)
    workers = [engine_policy(handler, sync_lock=lock) for _ in range(2)]
    threads = [threading.Thread(target=w.load, args=(published(1),)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert vllm.reloads == [str(WEIGHTS / "v1")]
    assert [draw(w).version for w in workers] == [1, 1]
    for w in workers:
        w.load(published(2))
    assert vllm.reloads == [str(WEIGHTS / "v1"), str(WEIGHTS / "v2")]
    assert not r.keys("rl:run:engine_sync:*")  # released


def test_a_newer_version_on_the_server_is_adopted_not_reloaded():
    """A server restarted on the newest published version serves more than this worker wants: its
    samples are stamped with what served them, v5, not the policy's v3 (the CI failure of 2026-12-07:
    a group stamped [v5, v5] was drawn from a server restarted on v6)."""
    vllm = FakeVllm()
    vllm.label = "run:5"
    policy = engine_policy(vllm)
    policy.load(published(3))
    span = VersionSpan()
    assert vllm.reloads == [] and draw(policy, span).version == 5
    assert span.bounds(3, 3) == (5, 5)


def test_a_server_reloaded_while_answering_stamps_both_versions():
    """Another worker reloads the shared server while this request is in flight: either version
    may have computed the answer, so the group's range holds both (min_version < max_version)."""
    vllm = FakeVllm()
    policy = engine_policy(vllm)
    policy.load(published(1))

    def handler(request):
        answer = vllm(request)
        if request.url.path == "/v1/completions":
            vllm.label = "run:2"  # reloaded and labelled by another worker before the version is read
        return answer

    policy = engine_policy(handler)
    policy.load(published(1))
    span = VersionSpan()
    assert draw(policy, span).version == 1 and (span.low, span.high) == (1, 2)
    assert span.bounds(1, 1) == (1, 2)


def test_another_runs_weights_are_reloaded_never_adopted():
    vllm = FakeVllm()
    vllm.label = "earlier-run:7"
    policy = engine_policy(vllm)
    assert draw(policy).version == 0 and vllm.reloads == [str(WEIGHTS / "v0")]


def test_every_group_sharing_a_merged_request_gets_both_versions_of_its_answer():
    """Two groups' draws of one prompt go out as one request (merge_requests), answered while the
    server was reloaded: the follower's group holds the range too, not only the leader's."""
    vllm, sent = FakeVllm(), []

    def handler(request):
        answer = vllm(request)
        if request.url.path == "/v1/completions":
            sent.append(json.loads(request.content)["n"])
            vllm.label = "run:2"
        return answer

    policy = engine_policy(handler, merge_requests=True)
    policy.load(published(1))
    sampler = RemoteSampler(policy, legacy_config().sample_kwargs())
    spans = [VersionSpan(), VersionSpan()]

    async def group(span):
        drawn_versions.set(span)
        return await sampler.sample_with_prompt_tokens(PROMPT)

    async def run():
        return await asyncio.gather(*(asyncio.create_task(group(span)) for span in spans))

    asyncio.run(run())
    assert sent == [2]
    assert [(span.low, span.high) for span in spans] == [(1, 2), (1, 2)]


def test_a_restarted_server_gets_its_samples_stamped_older_and_a_reload(caplog):
    vllm = FakeVllm()
    policy = engine_policy(vllm)
    policy.load(published(2))
    vllm.restart()  # died and came back with its start-up weights, between two requests
    span = VersionSpan()
    with caplog.at_level("WARNING"):
        first = draw(policy, span)
    assert first.version == 0 and vllm.completions[-1] == "base" and span.low == 0
    assert "restarted with other weights" in caplog.text
    assert span.bounds(2, 2) == (0, 2)  # the worker stamps the group's samples from v0, not the v2 it wanted
    second = draw(policy)
    assert second.version == 2 and vllm.reloads == [str(WEIGHTS / "v2")] * 2 and vllm.completions[-1].endswith("v2")


def test_a_dead_replica_is_skipped_with_a_warning_and_used_again_once_healthy(caplog, monkeypatch):
    from polling import wait_until

    monkeypatch.setattr(remote_policy, "BACKOFF_BASE_S", 0.01)
    a, b = FakeVllm(), FakeVllm()
    policy = engine_policy(Servers(**{"a.test": a, "b.test": b}), urls=("http://a.test/v1", "http://b.test/v1"))
    policy.load(published(1))
    assert a.reloads == [str(WEIGHTS / "v1")] and b.reloads == []  # the preferred one now, the other when used
    a.alive = False
    with caplog.at_level("WARNING"):
        assert draw(policy).version == 1
    assert "http://a.test/v1 stopped answering" in caplog.text and "using http://b.test/v1 meanwhile" in caplog.text
    assert b.reloads == [str(WEIGHTS / "v1")] and len(b.completions) == 1  # synced before its first request
    a.alive = True
    a.restart()
    wait_until(lambda: draw(policy) and len(a.completions) > 0, 10, "the preferred server to be used again")
    assert a.completions[-1] == str(WEIGHTS / "v1")  # reloaded: it came back with other weights


def test_with_none_up_draws_wait_for_one_and_nothing_fails(monkeypatch):
    monkeypatch.setattr(remote_policy, "BACKOFF_BASE_S", 0.01)
    vllm = FakeVllm()
    policy = engine_policy(vllm)
    policy.load(published(1))
    vllm.alive = False
    probes = []

    def restarting(request):
        if request.url.path == "/health" and not vllm.alive:
            probes.append(1)
            if len(probes) == 3:  # the engine is back, with its start-up weights
                vllm.alive = True
                vllm.restart()
            raise httpx.ConnectError("connection refused", request=request)
        return vllm(request)

    transport = httpx.MockTransport(restarting)
    policy = RemotePolicy(policy.cfg, published(1), FakeTokenizer(), "m", WEIGHTS, transport=transport,
                          sync_transport=transport, namespace="run")
    assert draw(policy).version == 1 and len(probes) >= 3 and vllm.completions[-1] == str(WEIGHTS / "v1")


def dropping_completions(drops):
    """A FakeVllm whose n-th completion request (from 1) is dropped when ``drops(n)``: its health probe and
    weight routes answer. (the handler, the list of completion requests)"""
    vllm, asked = FakeVllm(), []

    def handler(request):
        if request.url.path.endswith("/completions"):
            asked.append(1)
            if drops(len(asked)):
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return vllm(request)

    return handler, asked


def test_a_server_healthy_to_its_probe_that_drops_every_request_fails_the_draw_after_max_retries(monkeypatch):
    # Each drop marks it down, its /health answers, it is marked up and asked again: without a count the draw
    # went round forever (only the job's timeout ended it; an SDK client's, never). The first drop in a row
    # is free (a server that just died is failed over); the later ones are failed attempts.
    monkeypatch.setattr(remote_policy, "BACKOFF_BASE_S", 0.001)
    dropping, asked = dropping_completions(lambda n: True)
    policy = engine_policy(dropping, max_retries=2)
    policy.load(published(1))
    bounded = asyncio.wait_for(policy.complete(PROMPT, 1, max_tokens=1, temperature=1.0), 30)  # went round forever
    with pytest.raises(InferenceError, match=r"completion failed 3 times against http://a.test/v1 "
                       r"\(RemoteProtocolError: Server disconnected"):
        asyncio.run(bounded)
    assert len(asked) == 4  # one free drop, then max_retries + 1 counted ones


def test_replicas_that_drop_together_cost_no_attempt(monkeypatch):
    # A blip that takes both replicas down: each one's first drop is free (a dead server is waited for), so the
    # draw waits for them and succeeds even with no failed attempt allowed (the drops are counted per server).
    monkeypatch.setattr(remote_policy, "BACKOFF_BASE_S", 0.01)
    a, b = FakeVllm(), FakeVllm()
    both = Servers(**{"a.test": a, "b.test": b})
    probes = []

    def blip(request):
        if request.url.path == "/health" and not a.alive:
            probes.append(1)
            if len(probes) >= 4:  # both back, with their start-up weights
                a.alive = b.alive = True
                a.restart()
                b.restart()
        return both(request)

    policy = engine_policy(blip, urls=("http://a.test/v1", "http://b.test/v1"), max_retries=0, start_timeout=30)
    policy.load(published(1))
    assert draw(policy).version == 1
    a.alive = b.alive = False
    assert draw(policy).version == 1 and len(probes) >= 4


def test_one_dropped_request_of_a_server_that_then_answers_costs_no_attempt(monkeypatch):
    monkeypatch.setattr(remote_policy, "BACKOFF_BASE_S", 0.001)
    once, asked = dropping_completions(lambda n: n == 1)
    policy = engine_policy(once, max_retries=0)  # no failed attempt allowed: the drop must not count
    policy.load(published(1))
    assert draw(policy).version == 1 and len(asked) == 2


def test_no_server_up_within_start_timeout_fails_naming_them(monkeypatch):
    monkeypatch.setattr(remote_policy, "BACKOFF_BASE_S", 0.01)
    vllm = FakeVllm()
    vllm.alive = False
    policy = engine_policy(vllm, start_timeout=0.2)
    with pytest.raises(InferenceError, match=r"no inference server answered for 0s .*start_timeout.*a.test/v1"):
        draw(policy)


def test_refused_reloads_are_retried_then_reported_by_name(quick_reload_retries):
    vllm = FakeVllm()
    vllm.fail_next_reloads = 2
    policy = engine_policy(vllm)
    policy.load(published(1))  # refused twice, then loaded
    assert vllm.reloads == [str(WEIGHTS / "v1")] and not vllm.paused
    hidden = FakeVllm(visible=set())
    policy = engine_policy(hidden, weight_sync_timeout=0.2)
    with pytest.raises(InferenceError, match=r"http://a.test did not load v1 from /shared/runs/run/weights/v1 within "
                       r"0s \(inference.weight_sync_timeout; \d+ attempts\)\. The engine said: .*No such file"):
        policy.load(published(1))
    assert policy.version == 0 and not hidden.paused  # the next load tries again; the server is not left paused
    assert sum(1 for _, p in hidden.calls if p == "/collective_rpc") >= 2


def test_an_external_vllm_with_raw_logprobs_is_refused_once():
    vllm = FakeVllm()
    vllm.processed_logprobs = False
    policy = engine_policy(vllm, check_logprobs=True)
    for _ in range(2):
        with pytest.raises(EngineRefused, match="--logprobs-mode processed_logprobs"):
            draw(policy)
    assert sum(1 for _, p in vllm.calls if p == "/v1/completions") == 2  # the probe's two requests, once
    assert draw(engine_policy(FakeVllm(), check_logprobs=True)).version == 0


def test_sdk_exact_sync_goes_back_to_an_older_snapshot():
    vllm = FakeVllm()
    policy = engine_policy(vllm, exact=True)
    policy.load(published(3))
    policy.load(published(1))
    assert vllm.reloads == [str(WEIGHTS / "v3"), str(WEIGHTS / "v1")] and draw(policy).version == 1


def test_the_span_of_a_group_is_inherited_by_its_draw_tasks():
    span = VersionSpan()

    async def group():
        drawn_versions.set(span)

        async def one(v):
            from rlstream.sampling.stamps import record

            record(v)

        await asyncio.gather(one(3), one(1), one(2))

    asyncio.run(group())
    assert (span.low, span.high) == (1, 3) and span.bounds(2, 2) == (1, 3) and span.bounds(0, 4) == (1, 4)
    assert VersionSpan().bounds(2, 3) == (2, 3)  # no server reported a version: the policy's
    assert drawn_versions.get() is None  # set in the group's own task only


def test_pool_prefers_its_server_and_spreads_by_worker_id():
    assert server_pool.preferred_index("host-1", 1) == 0
    assert {server_pool.preferred_index(f"host-{i}", 3) for i in range(30)} == {0, 1, 2}


def test_an_openai_server_that_stopped_answering_is_tried_again_after_the_backoff(monkeypatch):
    """A generic server has no health route: the next request after the back-off is the probe."""
    monkeypatch.setattr(remote_policy, "BACKOFF_BASE_S", 0.01)
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) <= 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"choices": [choice(0, [1], [-0.1])]})

    out = asyncio.run(make_policy(handler, max_retries=0).complete(PROMPT, 1, max_tokens=1, temperature=1.0))
    assert out[0].output_tokens == [1] and calls == ["/v1/completions"] * 4  # no failed attempt counted


def test_a_pause_that_times_out_is_still_resumed(quick_reload_retries):
    """vLLM's pause?mode=wait waits for the requests in flight: a client that gives up on it
    leaves vLLM pausing anyway, so a resume must follow, or every worker's requests hang."""
    vllm = FakeVllm()

    def handler(request):
        if request.url.path == "/pause":
            vllm(request)  # it pauses once its requests in flight end, after the client gave up
            raise httpx.ReadTimeout("timed out", request=request)
        return vllm(request)

    policy = engine_policy(handler, weight_sync_timeout=0.2)
    with pytest.raises(InferenceError, match="did not load v1"):
        policy.load(published(1))
    assert not vllm.paused


def test_the_sync_lock_outlasts_the_longest_hold(r):
    """The holder reads the version, then reloads within weight_sync_timeout and resumes: a
    lock that expired at weight_sync_timeout would let a second worker reload the same server
    (and resume it in the middle of the first one's reload)."""
    from rlstream.core import keys

    vllm = FakeVllm()
    ttls = []

    def handler(request):
        if request.url.path == "/collective_rpc":
            ttls.append(r.pttl(keys.engine_sync_lock("run", "http://a.test/v1")) / 1000)
        return vllm(request)

    bound = 30.0
    lock = remote_policy.redis_sync_lock(r, "run", timeout=bound)
    engine_policy(handler, sync_lock=lock, weight_sync_timeout=bound).load(published(1))
    assert ttls and min(ttls) > bound + remote_policy.PROBE_TIMEOUT_S


def test_draws_answered_together_share_one_version_read():
    """One GET of the served version per round of answers, not one per completion."""
    vllm = FakeVllm()
    policy = engine_policy(vllm)

    async def many():
        await asyncio.gather(*(policy.complete(PROMPT, 1, max_tokens=1, temperature=1.0) for _ in range(16)))

    asyncio.run(many())
    reads = sum(1 for _, p in vllm.calls if p == "/weight_info")
    assert len(vllm.completions) == 16 and reads < 8


def test_an_openai_server_that_stopped_answering_is_sent_the_version_again():
    """openai servers cannot say what they serve: one that stopped answering may have restarted
    with its base weights, so the current version is POSTed again before its next completion
    (tests/e2e/test_inference_outage.py shows the wrong logprobs it otherwise serves)."""
    seen: list[str] = []

    def complete(request: httpx.Request) -> httpx.Response:
        seen.append("complete")
        if seen.count("complete") == 1:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"choices": [choice(0, [1], [-0.1])]})

    def sync(request: httpx.Request) -> httpx.Response:
        seen.append(f"sync v{json.loads(request.content)['version']}")
        return httpx.Response(200, json={})

    policy = make_policy(complete, sync_handler=sync, weight_sync_url="http://inference.test/update")
    policy.load(published(2))
    [completion] = asyncio.run(policy.complete(PROMPT, 1, max_tokens=1, temperature=1.0))
    assert seen == ["sync v2", "complete", "sync v2", "complete"]
    assert completion.version == 2


def test_a_weight_sync_the_server_does_not_answer_is_sent_once_it_does():
    """A version published while the openai server is down is not a failed job: it is sent
    before the next completion, once the server answers."""
    seen: list[str] = []
    down = [True]

    def sync(request: httpx.Request) -> httpx.Response:
        if down[0]:
            raise httpx.ConnectError("connection refused", request=request)
        seen.append(f"sync v{json.loads(request.content)['version']}")
        return httpx.Response(200, json={})

    def complete(request: httpx.Request) -> httpx.Response:
        seen.append("complete")
        return httpx.Response(200, json={"choices": [choice(0, [1], [-0.1])]})

    policy = make_policy(complete, sync_handler=sync, weight_sync_url="http://inference.test/update")
    policy.load(published(3))
    assert policy.version == 3 and seen == []
    down[0] = False
    [completion] = asyncio.run(policy.complete(PROMPT, 1, max_tokens=1, temperature=1.0))
    assert seen == ["sync v3", "complete"] and completion.version == 3


class WatchedLock:
    """A lock that says when someone asks for it while it is held (``contended``)."""

    def __init__(self, lock, contended):
        self.lock, self.contended = lock, contended

    def __enter__(self):
        if self.lock.locked():
            self.contended.set()
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()


def test_a_connection_dropped_during_a_weight_push_gets_the_newest_version_not_an_older_one():
    """openai: while load()'s POST of v3 is in flight, a completion's connection drops. The resync that the
    drop calls for POSTed v2 (the version still current) beside the v3 push, which may land after it and roll
    the server back under v3's stamp, and then v3 again: two reloads, one of them stale. Under one push at a
    time the resync waits for the load and sends v3 once (the drop, during the push, keeps the server
    unknown: the push may have reached a server that then restarted)."""
    import threading

    from polling import wait_until

    pushes, in_push, contended = [], threading.Event(), threading.Event()

    def sync(request: httpx.Request) -> httpx.Response:
        version = json.loads(request.content)["version"]
        pushes.append(version)
        if version == 3 and pushes.count(3) == 1:  # held until the draw's resync came (or waits for this push)
            in_push.set()
            wait_until(lambda: len(pushes) > 2 or contended.is_set(), 30, "the draw's resync")
        return httpx.Response(200, json={})

    asked = []

    def complete(request: httpx.Request) -> httpx.Response:
        asked.append(1)
        if len(asked) == 1:
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.", request=request)
        return httpx.Response(200, json={"choices": [choice(0, [1], [-0.1])]})

    policy = make_policy(complete, sync_handler=sync, weight_sync_url="http://inference.test/update", version=2)
    policy._push_lock = WatchedLock(getattr(policy, "_push_lock", threading.Lock()), contended)
    loading = threading.Thread(target=policy.load, args=(published(3),))
    loading.start()
    try:
        assert in_push.wait(30)
        [completion] = asyncio.run(asyncio.wait_for(policy.complete(PROMPT, 1, max_tokens=1, temperature=1.0), 30))
    finally:
        contended.set()
        loading.join(30)
    assert pushes == [2, 3, 3] and completion.version == 3 and policy.version == 3


def test_a_completion_answered_while_a_weight_push_is_in_flight_is_stamped_up_to_its_version():
    """openai: the server may switch to v3 at any moment of the POST that pushes it, so a completion answered
    meanwhile may come from v3. It was stamped [v2, v2] (the push not yet answered); its group's range must
    reach v3, its stamp (min_version) staying v2."""
    import threading

    in_push, drawn = threading.Event(), threading.Event()

    def sync(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["version"] == 3:
            in_push.set()
            drawn.wait(30)  # answered once the completion was
        return httpx.Response(200, json={})

    policy = make_policy(lambda r: httpx.Response(200, json={"choices": [choice(0, [1], [-0.1])]}),
                         sync_handler=sync, weight_sync_url="http://inference.test/update", version=2)
    loading = threading.Thread(target=policy.load, args=(published(3),))
    loading.start()
    try:
        assert in_push.wait(30)
        span = VersionSpan()

        async def one():
            drawn_versions.set(span)
            return (await policy.complete(PROMPT, 1, max_tokens=1, temperature=1.0))[0]

        completion = asyncio.run(one())
    finally:
        drawn.set()
        loading.join(30)
    assert completion.version == 2 and (span.low, span.high) == (2, 3) and span.bounds(2, 2) == (2, 3)
    assert policy.version == 3
