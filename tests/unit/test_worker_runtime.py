"""WorkerRuntime.run_group on fakeredis: what reaches the rollouts stream, what counts as a
failure for the circuit breaker, the run-wide counters, per-job seeding; and the rq
heartbeat rules of workers.jobs."""
from __future__ import annotations

import asyncio
import types

import fakeredis
import pytest
import torch

from rlstream.builtin.rollout import single_turn_factory
from rlstream.builtin.tiny_model import save_tiny_model
from rlstream.core import bus, keys, weights
from rlstream.core.codec import decode
from rlstream.core.config import Config
from rlstream.core.messages import GroupJob, GroupRejected, GroupSampled, RolloutSample, RunFinished, WeightsPublished
from rlstream.sampling.rollout_fn import accepted_context
from rlstream.workers.events import EventFollower
from rlstream.workers.jobs import heartbeat_ttl, still_alive
from rlstream.workers.runtime import CircuitOpen, WorkerRuntime, job_seed, policy_vocab_size

RUN = "t"


def caught_up(r) -> EventFollower:
    """The events as the process's follower thread would have folded them by now."""
    events = EventFollower(r, RUN, on_finished=lambda: None)
    events.catch_up()
    return events


def stub_runtime(r, rollout_fn, vocab_size: int = 10, **cfg) -> WorkerRuntime:
    """A runtime whose policy is already 'loaded' at v0 (the rollout_fn never samples)."""
    bus.xadd(r, keys.events(RUN), WeightsPublished(version=0, uri="/nowhere", sha256="0" * 64, bytes=0))
    rt = WorkerRuntime(Config(run_id=RUN, **cfg), r, worker_id="w", device="cpu",
                       rollout_fn_factory=lambda setup: rollout_fn, events=caught_up(r))
    rt.policy = types.SimpleNamespace(version=0, tokenizer=None)
    rt.rollout_fn, rt.vocab_size, rt.context_params = rollout_fn, vocab_size, accepted_context(rollout_fn)
    return rt


def job(G: int = 2, group_id: str = "e0-r3-a0") -> GroupJob:
    return GroupJob(run_id=RUN, group_id=group_id, row_index=3, epoch=0, attempt=0, submit_version=0,
                    group_size=G, row={"prompt": "1+1="})


def sample(tokens=(1, 2), reward: float = 1.0) -> RolloutSample:
    n = len(tokens)
    return RolloutSample(tokens=list(tokens), logprobs=[0.0] * n, loss_mask=[0] + [1] * (n - 1), reward=reward)


def stats(r) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(keys.rollout_stats(RUN)).items()}


def emitted(r) -> list[RolloutSample]:
    return [decode(fields[bus.FIELD])
            for _, fields in r.xrange(keys.rollouts(RUN))]


def events(r) -> list:
    return [m for _, m in bus.iter_all_events(r, RUN)]


def test_a_non_sample_return_trips_the_breaker_with_a_clear_message(r):
    async def rollout_fn(sample_prompt):
        return {"tokens": [1, 2]}

    rt = stub_runtime(r, rollout_fn, rollout_max_retries=10)
    with pytest.raises(CircuitOpen, match="rollout_fn must return rlstream.RolloutSample or None, got dict"):
        rt.run_group(job())
    [finished] = [m for m in events(r) if isinstance(m, RunFinished)]
    assert finished.failed and "got dict" in finished.reason
    assert stats(r)["rollout_failures"] >= 5  # counted run-wide in the same MULTI as RunFinished


def test_always_invalid_samples_trip_the_breaker(r):
    async def rollout_fn(sample_prompt):
        return RolloutSample(tokens=[1], logprobs=[0.0], loss_mask=[1], reward=1.0)  # < 2 tokens

    rt = stub_runtime(r, rollout_fn, max_incomplete_group_retries=10)
    with pytest.raises(CircuitOpen, match="at least 2 tokens"):
        rt.run_group(job())
    assert stats(r)["invalid_samples"] == rt.totals["invalid_samples"] >= 5


def test_mutating_the_frozen_sample_is_an_invalid_sample(r):
    calls = []

    async def rollout_fn(sample_prompt):
        calls.append(1)
        s = sample()
        if len(calls) == 1:
            s.reward = 0.5  # frozen: pydantic raises ValidationError
        return s

    rt = stub_runtime(r, rollout_fn)
    assert rt.run_group(job(2))["samples"] == 2
    assert stats(r) == {"invalid_samples": 1} and len(calls) == 3  # no failure: no field written


def test_counters_accumulate_run_wide_and_per_job(r):
    calls = []

    async def rollout_fn(sample_prompt):
        calls.append(1)
        if len(calls) == 1:
            return RolloutSample(tokens=[1], logprobs=[0.0], loss_mask=[1], reward=1.0)
        if len(calls) == 2:
            raise RuntimeError("flaky tool")
        return sample()

    rt = stub_runtime(r, rollout_fn)
    result = rt.run_group(job(2))
    assert result["invalid_samples"] == 1 and result["rollout_failures"] == 1
    assert rt.run_group(job(2, group_id="e0-r4-a0"))["invalid_samples"] == 0  # per job
    assert stats(r) == {"invalid_samples": 1, "rollout_failures": 1}
    assert len(emitted(r)) == 4
    # each group's GroupSampled rides in its samples' MULTI: the producer then knows not to re-dispatch it
    assert [(m.group_id, m.samples) for m in events(r) if isinstance(m, GroupSampled)] == [
        ("e0-r3-a0", 2), ("e0-r4-a0", 2)]


@pytest.mark.parametrize("bad", [(1, 12), tuple(range(1, 8))], ids=["outside-vocab", "over-max_seq_len"])
def test_out_of_vocab_or_too_long_samples_are_dropped_and_redrawn(r, bad):
    calls = []

    async def rollout_fn(sample_prompt):
        calls.append(1)
        return sample(bad) if len(calls) == 1 else sample()

    rt = stub_runtime(r, rollout_fn, vocab_size=10, max_seq_len=6)
    assert rt.run_group(job(2))["samples"] == 2
    assert all(max(s.tokens) < 10 and len(s.tokens) <= 6 for s in emitted(r))
    assert stats(r)["invalid_samples"] == 1


def test_a_group_left_too_small_is_rejected_and_still_counted(r):
    async def rollout_fn(sample_prompt, sample_index):
        return sample() if sample_index == 0 else sample((1, 99))

    rt = stub_runtime(r, rollout_fn, max_incomplete_group_retries=0)
    assert rt.run_group(job(3))["samples"] == 1
    assert [type(m) for m in events(r)][-1] is GroupRejected and emitted(r) == []
    assert stats(r)["invalid_samples"] == 2


def test_each_job_seeds_torch_from_its_group_id(r):
    async def rollout_fn(sample_prompt):
        return sample(reward=torch.rand(()).item())

    def rewards(group_id: str) -> list[float]:
        torch.manual_seed(0)  # what every worker process starts from
        rt = stub_runtime(fakeredis.FakeRedis(), rollout_fn)
        rt.run_group(job(2, group_id=group_id))
        return [s.reward for s in emitted(rt.r)]

    first = rewards("e0-r3-a0")
    assert rewards("e0-r4-a0") != first  # two workers on two groups draw differently
    assert rewards("e0-r3-a0") == first  # a re-run job reproduces its draws
    assert job_seed(0, "e0-r3-a0") != job_seed(1, "e0-r3-a0")


def test_vocab_size_of_a_remote_policy_is_its_tokenizer_length():
    assert policy_vocab_size(types.SimpleNamespace(tokenizer=[0] * 7)) == 7
    assert policy_vocab_size(types.SimpleNamespace(tokenizer=[0] * 7, vocab_size=9)) == 9


def test_real_policy_end_to_end_and_sample_kwargs_is_a_copy(r, tmp_path):
    model_dir = save_tiny_model(tmp_path / RUN / "weights" / ".tmp-v0")
    digest, size = weights.seal(model_dir, tmp_path / RUN / "weights" / "v0", version=0)
    # The worker reads <log_path>/<run>/weights/v0: the event's uri is never opened.
    bus.xadd(r, keys.events(RUN), WeightsPublished(version=0, uri="/attacker/chosen", sha256=digest, bytes=size))
    seen = {}

    def factory(setup):
        seen["setup"] = setup
        setup.sample_kwargs["max_tokens"] = 50  # a careless factory must not change the sampler's defaults
        return single_turn_factory(lambda text, row: 1.0)(setup)

    rt = WorkerRuntime(Config(run_id=RUN, max_completion_tokens=3, log_path=tmp_path), r, worker_id="w",
                       device=torch.device("cpu"), rollout_fn_factory=factory, events=caught_up(r))
    assert rt.run_group(job(2))["samples"] == 2
    assert seen["setup"].sampler.default_kwargs["max_tokens"] == 3
    assert rt.vocab_size == rt.policy.model.get_input_embeddings().num_embeddings
    assert len(emitted(r)) == 2 and not [m for m in events(r) if isinstance(m, (RunFinished, GroupRejected))]


def test_heartbeat_ttl_fits_inside_the_job_timeout():
    assert heartbeat_ttl(5) == 3 and heartbeat_ttl(20) == 10 and heartbeat_ttl(600) == 15
    assert heartbeat_ttl(None) == 15 and heartbeat_ttl(-1) == 15  # rq: no timeout
    assert all(heartbeat_ttl(t) < t for t in range(5, 100))


def test_heartbeat_stops_past_timeout_plus_grace():
    assert still_alive(69.0, 60, grace_s=10.0) and not still_alive(71.0, 60, grace_s=10.0)
    assert still_alive(1e9, None) and still_alive(1e9, -1)


def test_draws_of_a_failed_job_do_not_live_on_into_the_next_job(r):
    """gather does not cancel siblings and the loop outlives the job: a draw still sleeping
    when the breaker trips must be cancelled, not resumed during the next job."""
    started, finished = [], []

    async def rollout_fn(sample_prompt, sample_index):
        started.append(sample_index)
        if sample_index == 0:
            await asyncio.sleep(0.2)  # still running when its siblings trip the breaker
            finished.append(sample_index)
            return sample()
        raise RuntimeError("boom")

    rt = stub_runtime(r, rollout_fn, rollout_max_retries=10)
    with pytest.raises(CircuitOpen):
        rt.run_group(job(2))
    assert not asyncio.all_tasks(rt.loop)
    rt.loop.run_until_complete(asyncio.sleep(0.3))  # the next job's run on the same loop
    assert finished == []
