"""rlstream.trainer.step_metrics: the keys a step logs (the trainer's and a replay's), the
async offsets, the filter ratio, and rejected groups counted once."""
from __future__ import annotations

import random

from rlstream.core.messages import GroupRejected, RolloutRecord, StepCommitted, group_id_for, sample_id_for
from rlstream.core.run_state import RunState
from rlstream.trainer.batch import Group
from rlstream.trainer.commit import step_record
from rlstream.trainer.staleness import STALE_PREFIX, stale_total
from rlstream.trainer.step_metrics import (
    FILTER_REASON,
    LiveRun,
    RejectionTally,
    eval_metrics,
    rejected_total,
    step_metrics,
)

TRAIN = {"train/loss": 0.5, "train/lr": 1e-3}
ROLLOUT = {"rollout/accuracy", "rollout/truncated_ratio", "rollout/response_len/mean", "rollout/response_len/max",
           "rollout/response_len/min", "rollout/entropy"}
FILTER = {"rollout/raw_reward", "rollout/filtered_reward", "rollout/raw_samples", "rollout/filtered_samples",
          "rollout/filter_ratio"}
PERF = {"perf/step_time", "perf/train_time", "perf/train_wait_time", "perf/wait_time_ratio", "perf/step_samples_per_s",
        "perf/step_tokens_per_s"}
COMMON = {"step", "version", "rollout/reward_mean", "rollout/samples", "rollout/groups", *PERF, *TRAIN, *ROLLOUT,
          *FILTER}
LIVE = {"rollout/rejected_groups_total", "rollout/invalid_samples_total", "rollout/failures_total",
        "async/version_offset_max", "async/version_offset_mean", "async/submit_offset_max",
        "rollout/filter_reject_ratio", "async/stale_groups_dropped", "async/stale_groups_dropped_total"}


def group(row: int, rewards: list[float], min_version: int, submit_version: int) -> Group:
    gid = group_id_for(0, row, 0)
    g = Group(gid, len(rewards))
    for m, reward in enumerate(rewards):
        sample = RolloutRecord(tokens=[1, 2, 3], logprobs=[0.0, -1.0, -1.0], loss_mask=[0, 1, 1], reward=reward,
                               sample_id=sample_id_for(gid, m), group_id=gid, group_size=len(rewards),
                               row_index=row, min_version=min_version, max_version=min_version,
                               submit_version=submit_version)
        g.members[sample.sample_id] = (f"1-{row * 10 + m}", sample)
    return g


GROUPS = [group(0, [0.0, 1.0], min_version=4, submit_version=3), group(1, [1.0, 1.0], min_version=2, submit_version=2)]


def test_a_live_step_logs_the_stream_around_its_batch():
    live = LiveRun(wait_time=1.5, rejected_groups=2, worker_counts={"invalid_samples": 3}, filter_kept=3,
                   filter_rejected=1, filter_rejected_samples=4, filter_rejected_reward=1.0,
                   perf={"perf/step_time": 2.0, "perf/weight_update_time": 0.1})
    m = step_metrics(7, 6, GROUPS, TRAIN, train_time=0.5, live=live)
    assert set(m) == COMMON | LIVE | {"perf/weight_update_time", "perf/step_wall_time", "perf/weight_sync_time"}
    assert (m["step"], m["version"], m["rollout/samples"], m["rollout/groups"]) == (7, 6, 4, 2)
    assert m["rollout/reward_mean"] == 0.75 and m["train/loss"] == 0.5
    # the cookbook's timing: step_time (wall since the previous line), train_time (the step's work), the rest waiting
    assert (m["perf/step_time"], m["perf/train_time"], m["perf/train_wait_time"]) == (2.0, 0.5, 1.5)
    assert m["perf/wait_time_ratio"] == 0.75 and m["perf/step_samples_per_s"] == 2.0
    assert m["perf/step_tokens_per_s"] == 4.0  # 4 samples of 2 trained tokens in 2 s
    assert m["perf/step_wall_time"] == 2.0 and m["perf/weight_sync_time"] == 0.1  # the old names, for a release
    # the filter family: this batch (4 samples, reward 3) and the group the filter rejected (4 samples, reward 1)
    assert (m["rollout/raw_samples"], m["rollout/filtered_samples"], m["rollout/filter_ratio"]) == (8, 4, 0.5)
    assert (m["rollout/raw_reward"], m["rollout/filtered_reward"]) == (0.5, 0.75)
    # version 6 trained on policy 5: samples from versions 4 and 2, admitted at 3 and 2
    assert m["async/version_offset_max"] == 3 and m["async/version_offset_mean"] == 2
    assert m["async/submit_offset_max"] == 3
    assert m["rollout/invalid_samples_total"] == 3 and m["rollout/failures_total"] == 0
    assert m["rollout/rejected_groups_total"] == 2 and m["rollout/filter_reject_ratio"] == 0.25


def test_a_replayed_step_logs_only_its_batch():
    m = step_metrics(1, 1, GROUPS, TRAIN, train_time=0.1)
    assert set(m) == COMMON | {"perf/step_wall_time"} and m["perf/step_time"] == m["perf/train_time"] == 0.1
    assert m["perf/train_wait_time"] == 0
    assert m["rollout/raw_reward"] == m["rollout/filtered_reward"] and m["rollout/filter_ratio"] == 0.0


def test_no_filter_decision_is_a_zero_ratio():
    live = LiveRun(wait_time=0.0, rejected_groups=0, worker_counts={}, filter_kept=0, filter_rejected=0)
    assert step_metrics(1, 1, GROUPS, TRAIN, train_time=0.1, live=live)["rollout/filter_reject_ratio"] == 0.0


def test_an_evaluation_line_is_marked_by_its_version():
    assert eval_metrics(3, 2, {"eval/acc": 0.5}) == {"step": 3, "version": 2, "eval/version": 2, "eval/acc": 0.5}


def test_rejected_total_skips_filter_rejections_and_trained_groups():
    state = RunState()
    for gid, reason in [("a", "incomplete"), ("b", FILTER_REASON), ("c", "rollout job failed")]:
        state.apply(GroupRejected(group_id=gid, reason=reason, by="trainer"))
    assert rejected_total(state) == 2
    state.apply(StepCommitted(step=1, version=1, entry_ids=[], sample_ids=[], group_ids=["c"], metrics={}))
    assert rejected_total(state) == 1


def test_the_tally_counts_as_the_whole_fold_does_reading_only_what_is_new():
    """RejectionTally gives rejected_total and stale_total at every point of a run in which groups
    are rejected for every reason, some twice, some trained after their rejection, some trained
    before it; it classifies each rejection once (the fold's reasons are not read again)."""
    rng = random.Random(0)
    state = RunState()
    tally = RejectionTally(state)
    reasons = [FILTER_REASON, f"{STALE_PREFIX} sampled with v1", "incomplete", "rollout job failed"]
    read = []

    class Reasons(dict):
        def __getitem__(self, gid):
            read.append(gid)
            return super().__getitem__(gid)

    state.rejected = Reasons()
    for step in range(1, 60):
        for _ in range(rng.randrange(4)):
            gid = f"g{rng.randrange(120)}"
            state.apply(GroupRejected(group_id=gid, reason=rng.choice(reasons), by="trainer"))
        trained = [f"g{rng.randrange(120)}" for _ in range(rng.randrange(3))]
        state.apply(StepCommitted(step=step, version=step, entry_ids=[], sample_ids=[], group_ids=trained,
                                  metrics={}))
        read.clear()
        assert tally.totals() == (rejected_total(state), stale_total(state)), step
        before = state.rejected_order[:tally.rejected_seen - len(read)]  # classified by an earlier call
        assert len(read) == len(set(read)) and not set(read) & set(before)
    assert tally.totals()[0] > 0 and tally.totals()[1] > 0  # the run had both


def test_a_step_record_names_what_it_trained_in_order():
    record = step_record(1, 1, GROUPS, {"step": 1})
    assert record.entry_ids == ["1-0", "1-1", "1-10", "1-11"]
    assert record.group_ids == [g.group_id for g in GROUPS]
    assert record.sample_ids == [s.sample_id for g in GROUPS for s in g.samples]
