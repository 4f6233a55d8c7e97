"""``inference.merge_requests``: a group's single-sample draws of one prompt go out as one
``/completions`` request with n = G (docs/design.md §15.74 One request per group), against
``httpx.MockTransport``."""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import pytest

from rlstream.core.config import InferenceConfig
from rlstream.core.messages import WeightsPublished
from rlstream.sampling.remote import InferenceError, RemotePolicy, RemoteSampler

PROMPT = [3, 4, 5]
KWARGS = {"max_tokens": 2, "temperature": 1.0}


class Server:
    """Answers ``n`` distinct choices (token ``next id``), records each request's body; holds
    every answer until ``release`` is set when ``hold`` is."""

    def __init__(self, hold: bool = False, short: int = 0):
        self.bodies: list[dict] = []
        self.next_id, self.short = 0, short
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.bodies.append(body)
        await self.release.wait()
        choices = []
        for i in range(body["n"] - self.short):
            choices.append({"index": i, "text": "", "finish_reason": "stop", "token_ids": [self.next_id],
                            "logprobs": {"tokens": [""], "token_logprobs": [-1.0]}})
            self.next_id += 1
        return httpx.Response(200, json={"choices": choices})


def sampler(server: Server, merge_requests: bool = True) -> RemoteSampler:
    cfg = InferenceConfig(backend="openai", base_url="http://inference.test/v1", merge_requests=merge_requests)
    policy = RemotePolicy(cfg, WeightsPublished(version=0, uri="v0", sha256="0" * 64, bytes=1), None, "m",
                          Path("/weights"), transport=httpx.MockTransport(server))
    return RemoteSampler(policy, dict(KWARGS))


async def draws(s: RemoteSampler, prompts: list[list[int]], **kwargs) -> list[list[int]]:
    """The generated ids of one n=1 draw per prompt, all started in one loop pass (as a group's
    rollout_fn tasks start)."""
    out = await asyncio.gather(*[s.sample_with_prompt_tokens(p, n=1, **kwargs) for p in prompts])
    return [c.output_tokens[0] for [c] in out]


def test_a_group_of_single_draws_is_one_request_of_n_g():
    server = Server()
    got = asyncio.run(draws(sampler(server), [PROMPT] * 8))
    assert [b["n"] for b in server.bodies] == [8]
    assert sorted(got) == list(range(8))  # each draw its own choice


def test_draws_with_other_prompts_or_arguments_go_apart():
    server = Server()
    s = sampler(server)

    async def run():
        return await asyncio.gather(draws(s, [PROMPT] * 3 + [[3, 4]] * 2),
                                    draws(s, [PROMPT] * 2, temperature=0.5),
                                    s.sample_with_prompt_tokens(PROMPT, n=3))

    a, b, c = asyncio.run(run())
    # n=3 joins the three n=1 draws of the same prompt and arguments
    assert sorted((b["prompt"], b["n"], b["temperature"]) for b in server.bodies) == [
        ([3, 4], 2, 1.0), ([3, 4, 5], 2, 0.5), ([3, 4, 5], 6, 1.0)]
    assert len(c) == 3 and len({x for x in a + b} | {t.output_tokens[0] for t in c}) == 10


def test_merge_off_by_default_sends_each_draw_alone():
    assert InferenceConfig().merge_requests is False
    server = Server()
    asyncio.run(draws(sampler(server, merge_requests=False), [PROMPT] * 4))
    assert [b["n"] for b in server.bodies] == [1] * 4


def test_a_server_that_ignores_n_fails_every_draw_saying_what_to_set():
    s = sampler(Server(short=3))

    async def run():
        return await asyncio.gather(*[s.sample_with_prompt_tokens(PROMPT) for _ in range(4)],
                                    return_exceptions=True)

    errors = asyncio.run(run())
    assert all(isinstance(e, InferenceError) and "n=4" in str(e) and "merge_requests = false" in str(e)
               for e in errors), errors


def test_a_cancelled_leader_leaves_its_followers_to_draw_again():
    """A job's timeout cancels its tasks; draws of another job that joined its request must not
    fail with it: they send a request of their own."""
    server = Server(hold=True)
    s = sampler(server)

    async def run():
        leader = asyncio.create_task(s.sample_with_prompt_tokens(PROMPT))
        followers = [asyncio.create_task(s.sample_with_prompt_tokens(PROMPT)) for _ in range(3)]
        while not server.bodies:
            await asyncio.sleep(0)
        leader.cancel()
        await asyncio.sleep(0.01)
        server.release.set()
        with pytest.raises(asyncio.CancelledError):
            await leader
        return [c.output_tokens[0] for [c] in await asyncio.gather(*followers)]

    got = asyncio.run(asyncio.wait_for(run(), 10))
    assert [b["n"] for b in server.bodies] == [4, 3] and len(set(got)) == 3


def test_a_cancelled_follower_does_not_cancel_the_request():
    server = Server(hold=True)
    s = sampler(server)

    async def run():
        tasks = [asyncio.create_task(s.sample_with_prompt_tokens(PROMPT)) for _ in range(3)]
        while not server.bodies:
            await asyncio.sleep(0)
        tasks[2].cancel()
        server.release.set()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        return done

    first, second, third = asyncio.run(asyncio.wait_for(run(), 10))
    assert isinstance(third, asyncio.CancelledError)
    assert [b["n"] for b in server.bodies] == [3] and first[0].output_tokens != second[0].output_tokens


def test_a_leader_cancelled_while_its_group_gathers_leaves_the_joined_draws_to_draw_again():
    """A cancel that lands in the leader's one gathering pass (another job's timeout in the same
    pass): the draws that joined it must not wait on a request never sent."""
    server = Server()
    s = sampler(server)

    async def run():
        async def cancel_leader():
            leader.cancel()

        leader = asyncio.create_task(s.sample_with_prompt_tokens(PROMPT))
        follower = asyncio.create_task(s.sample_with_prompt_tokens(PROMPT))
        asyncio.create_task(cancel_leader())  # runs in the same pass, while the leader gathers
        [c] = await asyncio.wait_for(follower, 5)
        assert leader.cancelled()
        return c

    asyncio.run(run())
    assert [b["n"] for b in server.bodies] == [1]  # the follower's own request


def test_each_joined_draw_records_its_stamp_in_its_own_groups_span():
    """Two groups (each with its VersionSpan, as workers/runtime.py sets it) share one request:
    both spans see the version it was served with (docs/design.md §15.71 Engines sync through
    their own routes: a restarted server's older weights must lower every group's stamp)."""
    from rlstream.sampling.stamps import VersionSpan, drawn_versions

    server = Server()
    s = sampler(server)
    spans = [VersionSpan(), VersionSpan()]

    async def group(span):
        drawn_versions.set(span)
        return await s.sample_with_prompt_tokens(PROMPT)

    async def run():
        await asyncio.gather(*(asyncio.create_task(group(span)) for span in spans))

    asyncio.run(run())
    assert [b["n"] for b in server.bodies] == [2]
    assert [span.low for span in spans] == [0, 0]


def test_a_sampler_shared_by_two_event_loops_merges_within_each_loop_only():
    """The SDK may call one sampler from several threads, each with its own loop: a draw never
    joins a request gathering on another loop (it would await a future of that loop)."""
    server = Server()
    s = sampler(server)
    gathering, other_done, result = threading.Event(), threading.Event(), {}

    def other_thread():
        gathering.wait(5)
        try:
            result["ok"] = asyncio.run(asyncio.wait_for(s.sample_with_prompt_tokens(PROMPT), 5))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = repr(exc)
        other_done.set()

    async def first_loop():
        async def hold_the_gathering_pass():  # keeps this loop busy while the other thread draws
            gathering.set()
            other_done.wait(10)

        leader = asyncio.create_task(s.sample_with_prompt_tokens(PROMPT))
        asyncio.create_task(hold_the_gathering_pass())
        return await leader

    thread = threading.Thread(target=other_thread)
    thread.start()
    asyncio.run(first_loop())
    thread.join(10)
    assert "ok" in result, result
    assert sorted(b["n"] for b in server.bodies) == [1, 1]
