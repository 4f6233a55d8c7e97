"""Several prompt groups per rq job (docs/design.md §15.75 Several groups per rq job), on
fakeredis: the producer's admission in jobs of up to ``groups_per_job`` groups under the gate,
its re-dispatch and rejection per job of the groups still open, the worker's one ``generate``
and one MULTI per job, and the default number of groups a job carries."""
from __future__ import annotations

import types

import pytest
import torch
from factories import legacy_config
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.results import Result

from rlstream.builtin.rollout import PromptIds, single_turn_factory
from rlstream.builtin.tiny_model import save_tiny_model
from rlstream.core import bus, keys, weights
from rlstream.core.codec import decode
from rlstream.core.config import Config
from rlstream.core.jobs import JOB_FUNC, job_of, job_queue
from rlstream.core.messages import GroupAdmitted, GroupJob, GroupRejected, GroupSampled, RolloutJob, WeightsPublished
from rlstream.core.rollout import RolloutSample
from rlstream.core.run_state import RunState
from rlstream.producers.producer import (
    admission_order,
    admit_job,
    handle_failed_jobs,
    jobless_groups,
    pick_rows,
    redispatch,
    redispatch_stranded,
    stranded_jobs,
)
from rlstream.producers.stranded import STRANDED_GRACE_S, JobWatch
from rlstream.sampling.local import LocalSampler
from rlstream.workers.events import EventFollower
from rlstream.workers.jobs import job_draws
from rlstream.workers.runtime import WorkerRuntime, job_seed
from rlstream.workers.slots import JobSlots, generate_rows

RUN = "jobs"
ROWS = [{"prompt": f"{i % 10}+1="} for i in range(40)]


def config(**kw) -> Config:
    return legacy_config(run_id=RUN, **{"completions_per_prompt": 2, "prompt_groups_per_step": 4, **kw})


def admit_all(r, cfg: Config, state: RunState) -> list[list[GroupAdmitted]]:
    """What the producer's admission loop does while the gate is open: jobs of picked rows."""
    queue, pending = job_queue(r, cfg), admission_order(cfg, len(ROWS))
    next_row, jobs = next(pending, None), []
    while True:
        picked, next_row = pick_rows(cfg, state, next_row, pending)
        if not picked:
            return jobs
        jobs.append(admit_job(r, queue, cfg, picked, ROWS, state.published_version))
        for event in jobs[-1]:
            state.apply(event)


def payload(r, cfg: Config, job_id: str) -> RolloutJob:
    return RolloutJob.model_validate(job_queue(r, cfg).fetch_job(job_id).args[0])


def test_the_gate_fills_jobs_of_up_to_groups_per_job_and_never_holds_one_back(r):
    cfg = config(workers={"groups_per_job": 3}, max_head_offpolicy_versions=1)  # gate: 2 steps = 8 groups
    state = RunState()
    jobs = admit_all(r, cfg, state)
    assert [len(j) for j in jobs] == [3, 3, 2]  # the last job goes out with what the gate allows
    assert len(state.open_groups) == 8 and state.reserved_samples == 16
    for groups in jobs:
        job_id = keys.job_id(RUN, groups[0].group_id)
        assert {g.job_id for g in groups} == {job_id} and all(job_of(RUN, g) == job_id for g in groups)
        carried = payload(r, cfg, job_id)
        assert [g.group_id for g in carried.groups] == [g.group_id for g in groups]
        assert [g.row for g in carried.groups] == [ROWS[g.row_index] for g in groups]
    assert job_queue(r, cfg).count == 3
    assert job_queue(r, cfg).fetch_job(keys.job_id(RUN, jobs[0][0].group_id)).func_name == JOB_FUNC


def test_a_restarted_producer_skips_admitted_rows_inside_a_job(r):
    cfg = config(workers={"groups_per_job": 4}, max_head_offpolicy_versions=1)
    state = RunState()
    first = admit_all(r, cfg, state)
    again = RunState()
    for _, msg in bus.iter_all_events(r, RUN):
        again.apply(msg)
    assert admit_all(r, cfg, again) == [] and sum(map(len, first)) == 8


def test_an_event_from_before_jobs_carried_groups_names_its_own_job():
    old = GroupAdmitted(group_id="e0-r1-a0", row_index=1, epoch=0, attempt=0, submit_version=0, group_size=2)
    assert job_of(RUN, old) == keys.job_id(RUN, "e0-r1-a0")


def lose_job(r, cfg: Config, job_id: str) -> None:
    job_queue(r, cfg).remove(job_id)
    r.delete(Job.key_for(job_id))


def test_a_lost_job_is_enqueued_again_with_its_open_groups_only(r):
    cfg = config(workers={"groups_per_job": 3}, max_head_offpolicy_versions=0)  # 4 groups: jobs of 3 and 1
    state = RunState()
    jobs = admit_all(r, cfg, state)
    big = keys.job_id(RUN, jobs[0][0].group_id)
    lose_job(r, cfg, big)
    state.apply(GroupRejected(group_id=jobs[0][1].group_id, reason="by hand"))  # no longer open
    lost = jobless_groups(r, cfg, state)
    assert [g.group_id for g in lost] == [jobs[0][0].group_id, jobs[0][2].group_id]
    redispatch(r, job_queue(r, cfg), cfg, lost, ROWS)
    assert [g.group_id for g in payload(r, cfg, big).groups] == [jobs[0][0].group_id, jobs[0][2].group_id]
    assert jobless_groups(r, cfg, state) == []


def fail(r, cfg: Config, job_id: str, error: str) -> None:
    queue = job_queue(r, cfg)
    job = queue.fetch_job(job_id)
    queue.remove(job_id)
    FailedJobRegistry(queue=queue).add(job, ttl=600, exc_string=error)
    Result.create_failure(job, ttl=600, exc_string=error)  # what latest_result() reads


def test_a_failed_job_rejects_each_open_group_and_is_deleted(r):
    cfg = config(workers={"groups_per_job": 4}, max_head_offpolicy_versions=0)
    state = RunState()
    [groups] = admit_all(r, cfg, state)
    job_id = keys.job_id(RUN, groups[0].group_id)
    fail(r, cfg, job_id, "Traceback ...\nValueError: the reward server said no")
    handle_failed_jobs(r, job_queue(r, cfg), cfg, state, {}, ROWS)
    rejected = [m for _, m in bus.iter_all_events(r, RUN) if isinstance(m, GroupRejected)]
    assert [m.group_id for m in rejected] == [g.group_id for g in groups]
    assert {m.reason for m in rejected} == {"rollout job failed: ValueError: the reward server said no"}
    assert not r.exists(Job.key_for(job_id))


def test_an_abandoned_job_is_requeued_whole_and_a_sampled_one_only_removed(r):
    cfg = config(workers={"groups_per_job": 2}, max_head_offpolicy_versions=0)
    state = RunState()
    first, second = admit_all(r, cfg, state)
    abandoned, sampled = (keys.job_id(RUN, j[0].group_id) for j in (first, second))
    fail(r, cfg, abandoned, "rq.exceptions.AbandonedJobError: Abandoned")
    for g in second:  # its MULTI was written, then the worker died before rq recorded the job
        state.apply(GroupSampled(group_id=g.group_id, samples=2))
    fail(r, cfg, sampled, "rq.exceptions.AbandonedJobError: Abandoned")
    redispatched: dict[str, int] = {}
    handle_failed_jobs(r, job_queue(r, cfg), cfg, state, redispatched, ROWS)
    assert redispatched == {abandoned: 1} and abandoned in job_queue(r, cfg).job_ids
    assert not r.exists(Job.key_for(sampled))
    assert not [m for _, m in bus.iter_all_events(r, RUN) if isinstance(m, GroupRejected)]


def test_a_stranded_job_is_watched_once_for_all_its_groups(r):
    cfg = config(workers={"groups_per_job": 4}, max_head_offpolicy_versions=0)
    state = RunState()
    [groups] = admit_all(r, cfg, state)
    job_id = keys.job_id(RUN, groups[0].group_id)
    job_queue(r, cfg).remove(job_id)  # taken by a worker killed before it started the job: in no list
    watch, queue = JobWatch(cfg.job_timeout), job_queue(r, cfg)
    assert stranded_jobs(queue, cfg, state, watch, 0.0) == {}
    overdue = stranded_jobs(queue, cfg, state, watch, STRANDED_GRACE_S)
    assert list(overdue) == [job_id]
    redispatch_stranded(r, queue, cfg, state, overdue, ROWS, {})
    assert job_id in queue.job_ids and len(payload(r, cfg, job_id).groups) == 4


def test_job_draws_reads_the_payload():
    groups = [GroupJob(run_id=RUN, group_id=f"e0-r{i}-a0", row_index=i, epoch=0, attempt=0, submit_version=0,
                       group_size=3, row={}) for i in range(2)]
    job = types.SimpleNamespace(args=(RolloutJob(run_id=RUN, groups=groups).model_dump(mode="json"),))
    assert job_draws(job) == 6
    assert job_draws(types.SimpleNamespace(args=(groups[0].model_dump(mode="json"),))) == 3  # an older job
    assert job_draws(types.SimpleNamespace(args=("garbage",))) is None


def test_groups_per_job_default():
    assert config(prompt_groups_per_step=32, workers={"count": 2}).groups_per_job == 16
    assert config(prompt_groups_per_step=5, workers={"count": 2}).groups_per_job == 3
    assert config(prompt_groups_per_step=5, workers={"count": 0}).groups_per_job == 5
    remote = {"backend": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "m"}
    assert config(inference=remote).groups_per_job == 1
    assert config(inference=remote, workers={"groups_per_job": 4}).groups_per_job == 4
    with pytest.raises(ValueError):
        config(workers={"groups_per_job": 0})


def real_runtime(r, tmp_path, generated: list[int]) -> WorkerRuntime:
    model_dir = save_tiny_model(tmp_path / RUN / "weights" / ".tmp-v0")
    digest, size = weights.seal(model_dir, tmp_path / RUN / "weights" / "v0", version=0)
    bus.xadd(r, keys.events(RUN), WeightsPublished(version=0, uri="unused", sha256=digest, bytes=size))
    events = EventFollower(r, RUN, on_finished=lambda: None)
    events.catch_up()
    rt = WorkerRuntime(config(max_completion_tokens=1, max_seq_len=8, log_path=tmp_path), r, worker_id="w",
                       device=torch.device("cpu"), rollout_fn_factory=single_turn_factory(lambda text, row: 1.0),
                       events=events)
    rt.sync_weights(0)
    real = rt.policy.generate
    rt.policy.generate = lambda prompts, **kw: generated.append(len(prompts)) or real(prompts, **kw)
    return rt


def test_a_job_draws_its_groups_in_one_generate_and_records_them_in_one_multi(r, tmp_path):
    generated: list[int] = []
    rt = real_runtime(r, tmp_path, generated)
    groups = [GroupJob(run_id=RUN, group_id=f"e0-r{i}-a0", row_index=i, epoch=0, attempt=0, submit_version=0,
                       group_size=2, row=row) for i, row in enumerate([ROWS[0], {"prompt": "1+2=" * 3}, ROWS[2]])]
    before = r.xlen(keys.events(RUN))
    out = rt.run_job(RolloutJob(run_id=RUN, groups=groups))
    assert generated == [4]  # the two drawable groups' 2 + 2 rows; the long prompt never reaches the model
    assert [g["samples"] for g in out["groups"]] == [2, 0, 2]
    assert out["groups"][1]["rejected"].startswith("row 1: prompt of 12 tokens leaves no room")
    written = [m for _, m in bus.iter_all_events(r, RUN)][before:]
    assert [type(m).__name__ for m in written] == ["GroupSampled", "GroupRejected", "GroupSampled"]
    samples = [decode(fields[bus.FIELD]) for _, fields in r.xrange(keys.rollouts(RUN))]
    assert sorted(s.group_id for s in samples) == [groups[0].group_id] * 2 + [groups[2].group_id] * 2


def test_a_job_reproduces_its_draws_when_rq_runs_it_again(r, tmp_path):
    generated: list[int] = []
    rt = real_runtime(r, tmp_path, generated)
    job = RolloutJob(run_id=RUN, groups=[GroupJob(run_id=RUN, group_id=f"e0-r{i}-a0", row_index=i, epoch=0,
                                                  attempt=0, submit_version=0, group_size=4, row=ROWS[i])
                                         for i in range(3)])

    def tokens() -> list[list[int]]:
        start = r.xlen(keys.rollouts(RUN))
        rt.run_job(job)
        return [list(decode(f[bus.FIELD]).tokens) for _, f in r.xrange(keys.rollouts(RUN))][start:]

    torch.manual_seed(123)
    first = tokens()
    torch.manual_seed(456)  # whatever the process drew in between
    assert tokens() == first


def test_a_worker_preloads_the_modeling_code_of_its_model(tmp_path, monkeypatch):
    from transformers import Qwen2Config

    from rlstream.builtin.tiny_model import model_config
    from rlstream.sampling.local import preload_model_code

    asked = []

    class Mapping:  # transformers' lazy mapping imports the model class's module when indexed
        def __getitem__(self, config_class):
            asked.append(config_class)

    monkeypatch.setattr("transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING", Mapping())
    preload_model_code("builtin:tiny")
    model_config().save_pretrained(tmp_path / "hf")
    preload_model_code(str(tmp_path / "hf"))
    preload_model_code(str(tmp_path / "not-a-model"))  # left to the real load to report
    assert asked == [Qwen2Config, Qwen2Config]


def test_prompt_ids_tokenize_a_prompt_once_and_stay_bounded():
    calls = []

    def tokenizer(text, add_special_tokens):
        calls.append(text)
        return {"input_ids": [ord(c) for c in text]}

    ids_of = PromptIds(tokenizer, size=2)
    assert ids_of({"prompt": "1+1="}) == [49, 43, 49, 61]
    ids_of({"prompt": "1+1="}).append(0)  # a caller's list is its own
    assert ids_of({"prompt": "1+1="}) == [49, 43, 49, 61] and calls == ["1+1="]
    ids_of({"prompt": "2+2="})
    ids_of({"prompt": "3+3="})  # evicts the least recently used: "1+1="
    ids_of({"prompt": "1+1="})
    assert calls == ["1+1=", "2+2=", "3+3=", "1+1="]
    assert ids_of({"prompt": "x", "prompt_token_ids": [5, 6]}) == [5, 6]  # token ids win, as before


def test_a_job_enqueued_again_without_its_first_group_keeps_its_id_and_seed(r, tmp_path):
    """A lost job whose first group was settled by hand goes out again with its open groups only,
    under its own id: the worker counts its draws (by the run's token) and seeds from that id."""
    cfg = config(workers={"groups_per_job": 3}, max_head_offpolicy_versions=0)
    state = RunState()
    jobs = admit_all(r, cfg, state)
    rq_id = keys.job_id(RUN, jobs[0][0].group_id)
    lose_job(r, cfg, rq_id)
    state.apply(GroupRejected(group_id=jobs[0][0].group_id, reason="by hand"))
    redispatch(r, job_queue(r, cfg), cfg, jobless_groups(r, cfg, state), ROWS)
    rq_job = job_queue(r, cfg).fetch_job(rq_id)
    carried = RolloutJob.model_validate(rq_job.args[0])
    assert carried.job_id == rq_id and [g.group_id for g in carried.groups] == [g.group_id for g in jobs[0][1:]]
    rt = real_runtime(r, tmp_path, [])
    rt.slots = JobSlots(lambda: 64, group_size=2, max_jobs=8)
    run = rt.slots.take(rq_id, job_draws(rq_job))  # what RolloutWorker.execute_job does
    seeds = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("rlstream.workers.runtime.seed_torch", seeds.append)
        assert rt.run_job(carried, slot=run)["job_id"] == rq_id
    assert rt.slots.drawing.get(run, 0) == 0 and seeds == [job_seed(0, jobs[0][0].group_id)]


def test_an_abandoned_job_with_a_settled_group_goes_out_again_with_its_open_groups(r):
    cfg = config(workers={"groups_per_job": 3}, max_head_offpolicy_versions=0)
    state = RunState()
    first = admit_all(r, cfg, state)[0]
    job_id = keys.job_id(RUN, first[0].group_id)
    fail(r, cfg, job_id, "rq.exceptions.AbandonedJobError: Abandoned")
    state.apply(GroupRejected(group_id=first[1].group_id, reason="by hand"))
    handle_failed_jobs(r, job_queue(r, cfg), cfg, state, {}, ROWS)
    assert [g.group_id for g in payload(r, cfg, job_id).groups] == [first[0].group_id, first[2].group_id]
    assert job_id in job_queue(r, cfg).job_ids and FailedJobRegistry(queue=job_queue(r, cfg)).get_job_ids() == []


def poison_runtime(r, tmp_path) -> WorkerRuntime:
    """A user's rollout_fn (no built-in row check) that sends a row's own token ids to the sampler."""
    rt = real_runtime(r, tmp_path, [])
    sampler = LocalSampler(rt.policy, rt.cfg.sample_kwargs())

    async def rollout_fn(row):
        [c] = await sampler.sample_with_prompt_tokens(row["prompt_token_ids"], n=1, **rt.cfg.sample_kwargs())
        return RolloutSample(tokens=c.full_tokens, logprobs=[0.0] * c.prompt_len + c.inference_logprobs,
                             loss_mask=[0] * c.prompt_len + [1] * len(c.output_tokens), reward=1.0)

    rt.rollout_fn, rt.prompt_ids = rollout_fn, None
    return rt


@pytest.mark.parametrize("groups_per_job", [1, 6])
def test_one_poison_row_costs_its_group_only_however_many_share_its_generate(r, tmp_path, groups_per_job):
    rt = poison_runtime(r, tmp_path)
    rows = [{"prompt_token_ids": [5, 6]} for _ in range(5)] + [{"prompt_token_ids": [5, 10_000]}]  # row 5: poison
    groups = [GroupJob(run_id=RUN, group_id=f"e0-r{i}-a0", row_index=i, epoch=0, attempt=0, submit_version=0,
                       group_size=2, row=row) for i, row in enumerate(rows)]
    rejected = []
    for i in range(0, len(groups), groups_per_job):
        out = rt.run_job(RolloutJob(run_id=RUN, groups=groups[i:i + groups_per_job]))
        rejected += [g["group_id"] for g in out["groups"] if g["rejected"]]
    assert rejected == ["e0-r5-a0"] and not rt.breaker.tripped


def test_rows_per_generate_follow_the_token_budget():
    assert generate_rows(config(max_seq_len=16, completions_per_prompt=8)) == 512  # a whole built-in job
    assert generate_rows(config(max_seq_len=None, max_completion_tokens=1024, completions_per_prompt=8)) == 8
    assert generate_rows(config(max_seq_len=4096, completions_per_prompt=4)) == 4  # never less than a group
    assert generate_rows(config(max_seq_len=16, workers={"local_max_batch": 24})) == 24
