"""The trainer's staleness bound (docs/design.md §5 Versions and the gate): no group is
trained more than O + 1 versions after the weights it was sampled with. A straggler that
arrives past the bound, or a group that goes stale while it waits in ``ready``, is dropped
with an explicit GroupRejected naming the versions and the bound, and counted in the step's
metrics. The trainer runs on fakeredis with the built-in tiny model; the end-to-end check,
with deliberately slow rollouts, is tests/e2e/test_staleness_run.py. Before dropping it, the
trainer waits, bounded, for a group still being sampled that the batch it is about to take is
the last one allowed to train (docs/design.md §15.76 A straggler's last step waits for it)."""
from __future__ import annotations

from functools import partial

import factories
import pytest
from factories import legacy_config, sample

from rlstream.core import bus, keys
from rlstream.core.messages import (
    GroupAdmitted,
    GroupRejected,
    RolloutRecord,
    StepCommitted,
    group_id_for,
    sample_id_for,
)
from rlstream.trainer.batch import Group
from rlstream.trainer.staleness import (
    StragglerWait,
    last_chance,
    sampling_follows_weights,
    split_stale,
    stale_reason,
    stale_total,
)
from rlstream.trainer.trainer import Trainer

RUN = "st"
pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group


config = partial(factories.config, run_id=RUN, max_steps=10, max_head_offpolicy_versions=0,
                 save_final_checkpoint=False)


def sampled_with(row: int, m: int, sampled: int, submit: int) -> RolloutRecord:
    """Member ``m`` of row ``row``'s group, admitted at ``submit``, sampled with the weights of ``sampled``."""
    return sample(row, m, submit_version=submit, min_version=sampled, max_version=sampled)


def add_group(r, row: int, sampled: int, submit: int | None = None) -> str:
    """Admit row ``row`` at ``submit`` (default: ``sampled``) and XADD its two samples,
    sampled with the weights of ``sampled``."""
    submit = sampled if submit is None else submit
    gid = admit(r, row, submit)
    write_samples(r, row, sampled, submit)
    return gid


def admit(r, row: int, submit: int) -> str:
    """Row ``row``'s group admitted at ``submit``, its samples not written yet (being sampled)."""
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0,
                                                    submit_version=submit, group_size=2))
    return gid


def write_samples(r, row: int, sampled: int, submit: int) -> None:
    for m in range(2):
        bus.xadd(r, keys.rollouts(RUN), sampled_with(row, m, sampled, submit))


def group(row: int, *sampled: int, submit: int = 0) -> Group:
    gid = group_id_for(0, row, 0)
    g = Group(gid, len(sampled))
    for m, version in enumerate(sampled):
        g.members[sample_id_for(gid, m)] = (f"1-{m}", sampled_with(row, m, version, submit))
    return g


def step(t: Trainer) -> dict[str, float]:
    """One iteration of ``Trainer.run``'s loop, with P = 1."""
    t.buffer.fill(1, t.version)
    return t.train_step(t.buffer.take(1, t.version), wait_time=0.0)


def last_commit(r) -> StepCommitted:
    return [m for _, m in bus.iter_all_events(r, RUN) if isinstance(m, StepCommitted)][-1]


def rejections(r) -> dict[str, str]:
    return {m.group_id: m.reason for _, m in bus.iter_all_events(r, RUN) if isinstance(m, GroupRejected)}


def test_the_bound_is_o_plus_one_versions_from_the_oldest_member():
    assert stale_reason(group(0, 1, 1), trainer_version=2, bound=1, follows_weights=True) is None
    reason = stale_reason(group(0, 2, 0), trainer_version=2, bound=1, follows_weights=True)
    assert reason == ("stale: sampled with v0, trainer at v2: 2 versions behind, over the bound "
                      "max_head_offpolicy_versions + 1 = 1")
    keep, stale = split_stale([group(0, 3, 3), group(1, 0, 3), group(2, 2, 2)], 4, 1, True)
    assert [g.group_id for g in keep] == [group_id_for(0, 0, 0)]
    assert [g.group_id for g, _ in stale] == [group_id_for(0, 1, 0), group_id_for(0, 2, 0)]


def test_without_weight_sync_the_bound_counts_from_admission():
    """Samples stamped v0 forever (no weights reach the samplers) are not stale by that alone."""
    assert sampling_follows_weights(legacy_config())
    assert not sampling_follows_weights(legacy_config(weight_sync_interval=0))
    openai = {"backend": "openai", "base_url": "http://127.0.0.1:1/v1"}
    assert not sampling_follows_weights(legacy_config(inference=openai))
    assert sampling_follows_weights(legacy_config(inference={**openai, "weight_sync_url": "http://127.0.0.1:1/sync"}))
    assert stale_reason(group(0, 0, 0, submit=5), trainer_version=6, bound=1, follows_weights=False) is None
    reason = stale_reason(group(0, 0, 0, submit=4), trainer_version=6, bound=1, follows_weights=False)
    assert reason is not None and reason.startswith("stale: admitted at v4, trainer at v6")


def test_a_straggler_past_the_bound_is_dropped_and_counted(r, tmp_path):
    cfg = config(tmp_path)  # O = 0: the bound is 1
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    add_group(r, 0, sampled=0)
    step(t)
    add_group(r, 1, sampled=1)
    step(t)
    straggler = add_group(r, 2, sampled=0)  # sampled with v0, arrives when the trainer is at v2
    fresh = add_group(r, 3, sampled=2)
    m = step(t)
    assert rejections(r) == {straggler: "stale: sampled with v0, trainer at v2: 2 versions behind, over the "
                                        "bound max_head_offpolicy_versions + 1 = 1"}
    assert m["async/version_offset_max"] == 0 and m["async/stale_groups_dropped"] == 1
    assert m["async/stale_groups_dropped_total"] == 1 == stale_total(t.state)
    assert m["rollout/rejected_groups_total"] == 1  # a rejection like any other: audit counts it
    assert last_commit(r).group_ids == [fresh]
    assert bus.group_info(r, keys.rollouts(RUN))["pending"] == 0  # the straggler's entries were acked
    add_group(r, 4, sampled=3)
    assert step(t)["async/stale_groups_dropped"] == 0  # per step; the total stays
    assert last_commit(r).metrics["async/stale_groups_dropped_total"] == 1


def test_a_group_that_goes_stale_while_ready_is_dropped_at_take(r, tmp_path):
    cfg = config(tmp_path)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    *_, third = (add_group(r, row, sampled=0) for row in range(3))
    assert step(t)["async/version_offset_max"] == 0  # trains the first, the others wait in ready
    assert step(t)["async/version_offset_max"] == 1  # trains the second, still within the bound
    assert [g.group_id for g in t.buffer.ready] == [third]
    assert t.buffer.take(1, t.version) == []  # v2 is two versions past v0
    assert list(rejections(r)) == [third] and rejections(r)[third].startswith("stale: sampled with v0, trainer at v2")
    assert t.buffer.stale_in_batch == 1


def test_synchronous_training_bounds_by_one_version(r, tmp_path):
    cfg = config(tmp_path, max_head_offpolicy_versions=3, synchronous_training=True)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    add_group(r, 0, sampled=0)
    step(t)
    add_group(r, 1, sampled=1)
    step(t)
    late = add_group(r, 2, sampled=0)
    add_group(r, 3, sampled=2)
    step(t)
    assert list(rejections(r)) == [late]


def admitted(row: int, submit: int) -> GroupAdmitted:
    return GroupAdmitted(group_id=group_id_for(0, row, 0), row_index=row, epoch=0, attempt=0,
                         submit_version=submit, group_size=2)


def test_last_chance_is_a_group_still_sampled_that_the_next_step_would_drop():
    open_groups = [admitted(0, 2), admitted(1, 3), admitted(2, 4), admitted(3, 3)]
    here = {group_id_for(0, 3, 0)}  # arrived: it takes its place like any ready group
    # trainer at v5, bound 2: admitted at v3, the step at v5 is its last; v2 is past saving, v4 has a step more
    assert last_chance(open_groups, here, trainer_version=5, bound=2) == [group_id_for(0, 1, 0)]
    assert last_chance(open_groups, set(), trainer_version=4, bound=2) == [group_id_for(0, 0, 0)]


def test_the_wait_starts_with_a_ready_batch_and_lasts_one_step_of_the_last():
    wait = StragglerWait(1.0)
    assert wait.holding(now=0.0, batch_ready=True) is False  # the first batch of a process: no period yet
    assert wait.taken(now=0.0) == 0.0
    assert wait.taken(now=2.0) == 0.0 and wait.period == 2.0
    assert wait.holding(now=2.5, batch_ready=False)  # short of groups anyway: the wait has not started
    assert wait.holding(now=3.0, batch_ready=True)  # ready at 3.0: holds until 3.0 + 2.0
    assert wait.holding(now=4.9, batch_ready=True)
    assert not wait.holding(now=5.0, batch_ready=True)
    assert wait.taken(now=5.0) == 2.0
    assert wait.period == 1.0  # 3.0 since the last batch, less the 2.0 waited: a wait never lengthens the next
    assert StragglerWait(0.5).factor == 0.5


def two_steps_then_a_straggler(r, tmp_path, **over) -> tuple[Trainer, str, str]:
    """O = 1 (the bound is 2), two steps trained (the second measures a step's period); then, with the
    trainer at v2, a group admitted at v0 still being sampled (only the batch at v2 may train it) and a
    fresh one, sampled with v2, ready."""
    cfg = config(tmp_path, max_head_offpolicy_versions=1, **over)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    for row in range(2):
        add_group(r, row, sampled=row)
        step(t)
    straggler = admit(r, 2, submit=0)
    fresh = add_group(r, 3, sampled=2)
    return t, straggler, fresh


def arriving_on_the_second_read(t: Trainer, r, row: int, sampled: int, submit: int) -> None:
    """The straggler's samples land after the trainer's first read (which finds the fresh group)."""
    reads, collect = [], t.buffer.collect

    def collect_then_arrive():
        reads.append(1)
        if len(reads) == 2:
            write_samples(r, row, sampled, submit)
        collect()

    t.buffer.collect = collect_then_arrive


@pytest.mark.parametrize("streaming", [False, True])
def test_the_last_step_that_may_train_a_straggler_waits_for_it(r, tmp_path, streaming):
    """The fresh group could be taken at once; the straggler, admitted O + 1 versions ago, would be dropped by
    the next step. The trainer keeps its place, it arrives, it trains (the oldest first); the fresh one trains
    next, within the bound. Nothing is dropped."""
    over = {"trainer": {"micro_batch_tokens": 6, "streaming": True}} if streaming else {}
    t, straggler, fresh = two_steps_then_a_straggler(r, tmp_path, **over)
    arriving_on_the_second_read(t, r, 2, sampled=0, submit=0)
    groups, streamed = t.gather(1)
    assert [g.group_id for g in groups] == [straggler]
    m = t.train_step(groups, wait_time=0.0, streamed=streamed)
    assert m["async/version_offset_max"] == 2 and m["async/stale_groups_dropped"] == 0
    groups, streamed = t.gather(1)
    assert [g.group_id for g in groups] == [fresh]
    t.train_step(groups, wait_time=0.0, streamed=streamed)
    assert rejections(r) == {} and stale_total(t.state) == 0


def test_without_the_wait_the_straggler_is_dropped(r, tmp_path):
    """trainer.straggler_wait = 0: the batch goes with the fresh group, and the straggler, arriving, is stale."""
    t, straggler, fresh = two_steps_then_a_straggler(r, tmp_path, trainer={"straggler_wait": 0})
    assert [g.group_id for g in step_groups(t)] == [fresh]
    write_samples(r, 2, sampled=0, submit=0)  # the straggler's samples, now the trainer is at v3
    add_group(r, 4, sampled=3)
    assert step(t)["async/stale_groups_dropped"] == 1
    assert list(rejections(r)) == [straggler]


def step_groups(t: Trainer) -> list[Group]:
    """One step, P = 1; the groups it trained."""
    t.buffer.fill(1, t.version)
    groups = t.buffer.take(1, t.version)
    t.train_step(groups, wait_time=0.0)
    return groups


def test_a_straggler_that_never_comes_is_waited_for_once_then_dropped(r, tmp_path):
    """Bounded: the wait ends after about one step's time, the batch goes without it; when its samples come
    (a hung job, re-dispatched) it is past the bound and dropped. No later step waits for it again."""
    t, straggler, fresh = two_steps_then_a_straggler(r, tmp_path)
    assert [g.group_id for g in step_groups(t)] == [fresh]  # waited, in vain
    assert last_chance(t.state.open_groups, set(), t.version, t.buffer.bound) == []  # v3: no longer waited for
    write_samples(r, 2, sampled=0, submit=0)
    add_group(r, 4, sampled=3)
    assert step(t)["async/stale_groups_dropped"] == 1
    assert list(rejections(r)) == [straggler]
