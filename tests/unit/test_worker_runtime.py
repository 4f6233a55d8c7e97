"""WorkerRuntime.run_group on fakeredis: what reaches the rollouts stream, what counts as a
failure for the circuit breaker (a group lost to failed draws, keyed by its row), the
reasons rejected groups carry, the row checks before drawing, the run-wide counters,
per-job seeding, a later run's rejection of a group an earlier run wrote; and the rq heartbeat
rules of workers.jobs."""
from __future__ import annotations

import asyncio
import dataclasses
import math
import types

import fakeredis
import pytest
import torch
from factories import legacy_config, user_sample
from rq.timeouts import JobTimeoutException

from rlstream.builtin.rollout import single_turn_factory
from rlstream.builtin.tiny_model import save_tiny_model
from rlstream.core import bus, keys, weights
from rlstream.core.codec import decode
from rlstream.core.messages import (
    GroupAdmitted,
    GroupJob,
    GroupRejected,
    GroupSampled,
    RolloutRecord,
    RunFinished,
    StepCommitted,
    WeightsPublished,
)
from rlstream.core.rollout import RolloutSample
from rlstream.core.run_state import RunState
from rlstream.ops.audit import audit_ledger
from rlstream.producers.gate import can_admit
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
    rt = WorkerRuntime(legacy_config(run_id=RUN, **cfg), r, worker_id="w", device="cpu",
                       rollout_fn_factory=lambda setup: rollout_fn, events=caught_up(r))
    rt.policy = types.SimpleNamespace(version=0, tokenizer=None)
    rt.rollout_fn, rt.vocab_size, rt.context_params = rollout_fn, vocab_size, accepted_context(rollout_fn)
    return rt


def job(G: int = 2, group_id: str = "e0-r3-a0", row_index: int = 3, row: dict | None = None) -> GroupJob:
    return GroupJob(run_id=RUN, group_id=group_id, row_index=row_index, epoch=0, attempt=0, submit_version=0,
                    group_size=G, row=row or {"prompt": "1+1="})


def row_job(row_index: int, epoch: int = 0, G: int = 2) -> GroupJob:
    return GroupJob(run_id=RUN, group_id=f"e{epoch}-r{row_index}-a0", row_index=row_index, epoch=epoch, attempt=0,
                    submit_version=0, group_size=G, row={"prompt": "1+1="})


def stats(r) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in r.hgetall(keys.rollout_stats(RUN)).items()}


def emitted(r) -> list[RolloutRecord]:
    return [decode(fields[bus.FIELD])
            for _, fields in r.xrange(keys.rollouts(RUN))]


def events(r) -> list:
    return [m for _, m in bus.iter_all_events(r, RUN)]


def rejections(r) -> dict[str, str]:
    return {m.group_id: m.reason for m in events(r) if isinstance(m, GroupRejected)}


def test_a_later_run_whose_draws_fail_does_not_unreserve_a_group_already_written(r):
    """A job run twice (a retry, or a re-dispatch after its worker hung or died): the first run wrote the
    group (samples and GroupSampled), the later run's draws all fail and it writes GroupRejected, as it
    must not know better. Once written, only the trainer settles a group (docs/design.md §15.98 A
    written group is the trainer's to settle): every reader of the log voids that rejection. Counted, the
    gate's reserved samples dropped by G while the trainer still trained the group, and the gate
    admitted one group too many."""
    failing = {"now": False}

    async def rollout_fn(sample_prompt):
        if failing["now"]:
            raise ValueError("the inference server went away")
        return user_sample()

    rt = stub_runtime(r, rollout_fn, rollout_max_retries=0, max_incomplete_group_retries=0, prompt_groups_per_step=1,
                      max_head_offpolicy_versions=0)
    group = job(G=2)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=group.group_id, row_index=group.row_index, epoch=0,
                                                attempt=0, submit_version=0, group_size=2))
    assert rt.run_group(group)["samples"] == 2  # the first run writes the group
    failing["now"] = True
    assert "went away" in rt.run_group(group)["rejected"]  # the later run of the same job rejects it
    assert [type(m).__name__ for m in events(r)][-2:] == ["GroupSampled", "GroupRejected"]

    state = RunState()
    for msg in events(r):
        state.apply(msg)
    assert state.rejected == {} and [g.group_id for g in state.open_groups] == [group.group_id]
    assert state.reserved_samples == 2  # B = 2 with O = 0: the gate's one batch is still taken
    assert not can_admit(2, published_version=0, offpolicy_versions=0, batch_size=2,
                         accepted_plus_reserved=state.reserved_samples, max_in_flight=None,
                         in_flight=state.in_flight_samples)
    samples = emitted(r)
    trained = StepCommitted(step=1, version=1, entry_ids=[e.decode() for e, _ in r.xrange(keys.rollouts(RUN))],
                            sample_ids=[s.sample_id for s in samples], group_ids=[group.group_id])
    state.apply(trained)
    assert state.reserved_samples == state.trained_samples == 2 and state.open_groups == []
    report = audit_ledger(events(r) + [trained], samples, job_exists=lambda admitted: False)
    assert (report.trained, report.rejected, report.rejected_after_training, report.lost) == (1, 0, [], [])

    stale = GroupRejected(group_id=group.group_id, reason="stale: sampled with v0", by="trainer")
    late = RunState()
    for msg in events(r) + [stale]:  # the trainer may still reject it: its rejection stands
        late.apply(msg)
    assert late.rejected == {group.group_id: stale.reason} and late.reserved_samples == 0
    assert audit_ledger(events(r) + [stale], samples, lambda admitted: False).rejected_reasons == {stale.reason: 1}


def test_a_non_sample_return_trips_the_breaker_with_a_clear_message(r):
    """Failing on every row (here 5 distinct rows in a row) stops the run: the breaker trips
    on the fifth group, naming the error; the four before are rejected with it."""
    async def rollout_fn(sample_prompt):
        return {"tokens": [1, 2]}

    rt = stub_runtime(r, rollout_fn, rollout_max_retries=10)
    for row in range(4):
        assert "got dict" in rt.run_group(row_job(row))["rejected"]
    with pytest.raises(CircuitOpen, match="rollout_fn must return rlstream.RolloutSample or None, got dict"):
        rt.run_group(row_job(4))
    [finished] = [m for m in events(r) if isinstance(m, RunFinished)]
    assert finished.failed and "got dict" in finished.reason
    assert stats(r)["rollout_failures"] >= 5  # counted run-wide in the same MULTI as RunFinished
    assert len(rejections(r)) == 5  # the group that tripped it is settled too


def test_always_invalid_samples_trip_the_breaker(r):
    async def rollout_fn(sample_prompt):
        return RolloutSample(tokens=[1], logprobs=[0.0], loss_mask=[1], reward=1.0)  # < 2 tokens

    rt = stub_runtime(r, rollout_fn, max_incomplete_group_retries=10)
    with pytest.raises(CircuitOpen, match="at least 2 tokens"):
        for row in range(5):
            rt.run_group(row_job(row))
    assert stats(r)["invalid_samples"] == rt.totals["invalid_samples"] >= 5


def test_a_poison_row_costs_its_group_never_the_run(r):
    """A row whose every draw raises, however often it comes back, is rejected with the
    exception text each time; the run goes on (the old per-draw breaker tripped within
    its first group)."""
    async def rollout_fn(sample_prompt, row_index):
        if row_index == 7:
            raise ValueError("reward_fn cannot score row 7")
        return user_sample()

    rt = stub_runtime(r, rollout_fn, rollout_max_retries=2, max_incomplete_group_retries=1)
    for epoch in range(12):  # back to back, and between good rows
        assert rt.run_group(row_job(7, epoch, G=4))["samples"] == 0
    for epoch in range(12, 24):
        assert rt.run_group(row_job(7, epoch, G=4))["samples"] == 0
        assert rt.run_group(row_job(epoch, G=4))["samples"] == 4
    assert not [m for m in events(r) if isinstance(m, RunFinished)]
    reasons = rejections(r)
    assert len(reasons) == 24 and all(gid.split("-")[1] == "r7" for gid in reasons)
    assert set(reasons.values()) == {
        "ValueError: reward_fn cannot score row 7 (only 0 of 4 draws returned a valid sample)"}
    assert stats(r)["rollout_failures"] == 24 * 4 * 3 * 2  # groups x G x (1 + retries) x (1 + redraw rounds)


def test_a_nan_reward_rejects_the_group_with_the_validation_message(r):
    async def rollout_fn(sample_prompt, row_index):
        return user_sample(reward=math.nan if row_index == 5 else 1.0)  # the model refuses a non-finite reward

    rt = stub_runtime(r, rollout_fn)
    for epoch in range(8):
        assert rt.run_group(row_job(5, epoch, G=4))["samples"] == 0
    assert not [m for m in events(r) if isinstance(m, RunFinished)]
    assert set(rejections(r).values()) == {
        "invalid sample: reward must be finite, got nan (only 0 of 4 draws returned a valid sample)"}
    assert rt.run_group(row_job(6, G=4))["samples"] == 4


def test_a_long_exception_text_is_cut_in_the_reason(r):
    async def rollout_fn(sample_prompt):
        raise RuntimeError("x" * 5000 + "\nsecond line")

    rt = stub_runtime(r, rollout_fn, rollout_max_retries=0, max_incomplete_group_retries=0)
    reason = rt.run_group(job(2))["rejected"]
    assert reason.startswith("RuntimeError: xxx") and "\n" not in reason and len(reason) < 300


def test_failures_on_a_few_rows_do_not_trip_but_on_many_rows_do(r):
    """Four poison rows back to back are four rejected groups; a fifth distinct one after
    them (no sampled group in between) is a failing rollout_fn: the breaker trips."""
    bad_rows = {10, 11, 12, 13, 14}

    async def rollout_fn(sample_prompt, row_index):
        if row_index in bad_rows:
            raise ConnectionError(f"tool server down for row {row_index}")
        return user_sample()

    rt = stub_runtime(r, rollout_fn, rollout_max_retries=0, max_incomplete_group_retries=0)
    for epoch in range(3):
        for row in (10, 11, 12, 13, 1):
            rt.run_group(row_job(row, epoch))
    with pytest.raises(CircuitOpen, match=r"last error \(row 14\): ConnectionError: tool server down for row 14"):
        for row in (10, 11, 12, 13, 14):
            rt.run_group(row_job(row, epoch=3))


def test_a_group_lost_to_none_returns_does_not_feed_the_breaker(r):
    async def rollout_fn(sample_prompt):
        return None  # the rollout_fn's own choice to skip a draw

    rt = stub_runtime(r, rollout_fn)
    for row in range(10):
        assert rt.run_group(row_job(row))["rejected"] == "only 0 of 2 draws returned a valid sample"
    assert not rt.breaker.recent and not [m for m in events(r) if isinstance(m, RunFinished)]


@pytest.mark.parametrize(("ids", "reason"), [
    (list(range(1, 7)), "row 3: prompt of 6 tokens leaves no room under max_seq_len 6"),
    ([1, 2, 12], "row 3: token id 12 >= vocab size 10"),
    ([], "row 3: the prompt has no tokens"),
], ids=["too-long", "outside-vocab", "empty"])
def test_a_row_no_draw_can_use_is_rejected_before_drawing(r, ids, reason):
    calls = []

    async def rollout_fn(sample_prompt):
        calls.append(1)
        return user_sample()

    rt = stub_runtime(r, rollout_fn, vocab_size=10, max_seq_len=6)
    rt.prompt_ids = lambda row: row["prompt_token_ids"]  # what the built-in rollout sets up
    for epoch in range(10):
        bad = GroupJob(run_id=RUN, group_id=f"e{epoch}-r3-a0", row_index=3, epoch=epoch, attempt=0, submit_version=0,
                       group_size=2, row={"prompt_token_ids": ids})
        assert rt.run_group(bad)["rejected"].startswith(reason)
    assert calls == [] and not rt.breaker.recent and stats(r) == {}  # no draw, no failure, no breaker count
    assert rt.run_group(job(2, row={"prompt_token_ids": [1, 2]}))["samples"] == 2


def test_a_row_the_tokenizer_rejects_is_rejected_with_the_error(r):
    async def rollout_fn(sample_prompt):
        return user_sample()

    def prompt_ids(row):
        raise KeyError("messages")

    rt = stub_runtime(r, rollout_fn)
    rt.prompt_ids = prompt_ids
    assert rt.run_group(job(2))["rejected"] == "row 3: the prompt could not be tokenized: KeyError: 'messages'"


def test_a_sample_edited_after_building_is_sent_as_edited(r):
    """The user's RolloutSample is a plain dataclass: assigned fields and replace() copies are
    what the worker converts, once rollout_fn returns."""
    async def rollout_fn(sample_prompt, sample_index):
        s = user_sample()
        s.reward = 0.5
        s.tokens.append(2), s.logprobs.append(-0.5), s.loss_mask.append(1)
        return dataclasses.replace(s, text=f"draw {sample_index}")

    rt = stub_runtime(r, rollout_fn)
    assert rt.run_group(job(2))["samples"] == 2
    assert [(s.reward, s.tokens.tolist(), s.text) for s in emitted(r)] == [(0.5, [1, 2, 2], "draw 0"),
                                                                        (0.5, [1, 2, 2], "draw 1")]
    assert stats(r) == {}


def test_an_invalid_sample_is_rejected_at_conversion_with_what_to_fix(r):
    async def rollout_fn(sample_prompt, row_index):
        if row_index == 5:
            return user_sample(prompt_model_input={"image": "..."})
        return user_sample(loss_mask=[0, 0]) if row_index == 6 else user_sample()

    rt = stub_runtime(r, rollout_fn, max_incomplete_group_retries=0)
    assert rt.run_group(row_job(5, G=2))["rejected"].startswith(
        "invalid sample: prompt_model_input is set, but rlstream trains text-only causal LMs")
    assert rt.run_group(row_job(6, G=2))["rejected"] == (
        "invalid sample: loss_mask has no 1: nothing in this sample would be trained (only 0 of 2 draws returned a "
        "valid sample)")
    assert rt.run_group(row_job(7, G=2))["samples"] == 2
    assert stats(r) == {"invalid_samples": 4}


def test_counters_accumulate_run_wide_and_per_job(r):
    calls = []

    async def rollout_fn(sample_prompt):
        calls.append(1)
        if len(calls) == 1:
            return RolloutSample(tokens=[1], logprobs=[0.0], loss_mask=[1], reward=1.0)
        if len(calls) == 2:
            raise RuntimeError("flaky tool")
        return user_sample()

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
        return user_sample(bad) if len(calls) == 1 else user_sample()

    rt = stub_runtime(r, rollout_fn, vocab_size=10, max_seq_len=6)
    assert rt.run_group(job(2))["samples"] == 2
    assert all(max(s.tokens) < 10 and len(s.tokens) <= 6 for s in emitted(r))
    assert stats(r)["invalid_samples"] == 1


def test_a_group_left_too_small_is_rejected_and_still_counted(r):
    async def rollout_fn(sample_prompt, sample_index):
        return user_sample() if sample_index == 0 else user_sample((1, 99))

    rt = stub_runtime(r, rollout_fn, max_incomplete_group_retries=0)
    assert rt.run_group(job(3))["samples"] == 1
    assert [type(m) for m in events(r)][-1] is GroupRejected and emitted(r) == []
    assert stats(r)["invalid_samples"] == 2


def test_each_job_seeds_torch_from_its_group_id(r):
    async def rollout_fn(sample_prompt):
        return user_sample(reward=torch.rand(()).item())

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


def test_the_built_in_rollout_checks_rows_with_the_real_tokenizer(r, tmp_path):
    model_dir = save_tiny_model(tmp_path / RUN / "weights" / ".tmp-v0")
    digest, size = weights.seal(model_dir, tmp_path / RUN / "weights" / "v0", version=0)
    bus.xadd(r, keys.events(RUN), WeightsPublished(version=0, uri="unused", sha256=digest, bytes=size))
    rt = WorkerRuntime(legacy_config(run_id=RUN, max_completion_tokens=1, max_seq_len=8, log_path=tmp_path), r,
                       worker_id="w", device=torch.device("cpu"),
                       rollout_fn_factory=single_turn_factory(lambda text, row: 1.0), events=caught_up(r))
    long_prompt = rt.run_group(job(2, row={"prompt": "1+2=" * 3}))
    assert long_prompt["rejected"] == ("row 3: prompt of 12 tokens leaves no room under max_seq_len 8; "
                                       "shorten the prompt or raise max_seq_len")
    vocab = rt.vocab_size
    outside = rt.run_group(job(2, group_id="e0-r4-a0", row_index=4, row={"prompt_token_ids": [1, vocab + 5]}))
    assert outside["rejected"] == f"row 4: token id {vocab + 5} >= vocab size {vocab}"
    assert rt.run_group(job(2, group_id="e0-r5-a0", row_index=5))["samples"] == 2
    assert stats(r) == {} and list(rt.breaker.recent) == [(True, 5)]  # only the sampled group was judged


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

    rt = WorkerRuntime(legacy_config(run_id=RUN, max_completion_tokens=3, log_path=tmp_path), r, worker_id="w",
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
    when rq's job timeout ends the job must be cancelled, not resumed during the next job.
    The timeout (rq raises it from SIGALRM wherever the job is) is no draw failure: it is
    not retried, it ends the job."""
    started, finished = [], []

    async def rollout_fn(sample_prompt, sample_index):
        started.append(sample_index)
        if sample_index == 0:
            await asyncio.sleep(0.2)  # still running when the job times out
            finished.append(sample_index)
            return user_sample()
        raise JobTimeoutException("Task exceeded maximum timeout value (60 seconds)")

    rt = stub_runtime(r, rollout_fn, rollout_max_retries=10)
    with pytest.raises(JobTimeoutException):
        rt.run_group(job(2))
    assert started == [0, 1] and rt.totals == {}
    assert not asyncio.all_tasks(rt.loop)
    rt.loop.run_until_complete(asyncio.sleep(0.3))  # the next job's run on the same loop
    assert finished == []


def test_concurrent_groups_are_stamped_with_the_versions_at_their_start_and_end(r):
    """With several groups in flight another job may load newer weights while a group is
    drawn (docs/design.md §15.50 Many groups in flight per worker): its samples carry
    min_version = the version when it started and max_version = the one when it ended."""
    async def rollout_fn(row):
        await asyncio.sleep(0)
        rt.policy.version = 1  # as if another job of this worker loaded v1 meanwhile
        return user_sample()

    rt = stub_runtime(r, rollout_fn)
    concurrent = WorkerRuntime(rt.cfg, r, worker_id="w", device="cpu", rollout_fn_factory=lambda setup: rollout_fn,
                               events=rt.events, concurrent=True)
    concurrent.policy, concurrent.rollout_fn = rt.policy, rollout_fn
    concurrent.vocab_size, concurrent.context_params = rt.vocab_size, rt.context_params
    rt = concurrent
    try:
        out = rt.run_group(job())
    finally:
        rt.sampling.close()
    assert out["samples"] == 2
    assert [(s.min_version, s.max_version) for s in emitted(r)] == [(0, 1), (0, 1)]
