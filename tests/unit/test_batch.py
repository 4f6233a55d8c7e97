"""rlstream.trainer.batch: group assembly with dedup, and collation/alignment."""
from __future__ import annotations

from functools import partial

import factories
import torch

from rlstream.core.messages import RolloutRecord, group_id_for, sample_id_for
from rlstream.trainer.batch import Group, GroupAssembler, collate, take_oldest

sample = partial(factories.sample, tokens=(1, 2, 3), reward=0.0, group_size=3)  # groups of three equal members


def test_group_completes_at_group_size():
    a = GroupAssembler()
    assert a.add("1-0", sample(0, 0), set()) == (None, None)
    assert a.add("1-1", sample(1, 0), set()) == (None, None)  # another group interleaved
    assert a.add("1-2", sample(0, 1), set()) == (None, None)
    group, dup = a.add("1-3", sample(0, 2), set())
    assert dup is None and isinstance(group, Group) and group.complete
    assert group.group_id == group_id_for(0, 0, 0) and group.size == 3
    assert group.entry_ids == ["1-0", "1-2", "1-3"]
    assert [s.sample_id for s in group.samples] == [sample_id_for(group_id_for(0, 0, 0), m) for m in range(3)]
    assert list(a.open) == [group_id_for(0, 1, 0)]  # the completed group left the open set


def test_duplicate_sample_id_returns_its_entry():
    a = GroupAssembler()
    a.add("1-0", sample(0, 0), set())
    assert a.add("1-5", sample(0, 0, reward=9.0), set()) == (None, "1-5")
    # the first copy is kept
    g = a.open[group_id_for(0, 0, 0)]
    assert g.entry_ids == ["1-0"] and g.samples[0].reward == 0.0
    a.add("1-6", sample(0, 1), set())
    group, dup = a.add("1-7", sample(0, 2), set())
    assert group is not None and dup is None and group.entry_ids == ["1-0", "1-6", "1-7"]


def test_samples_of_settled_groups_come_back_as_duplicates():
    a = GroupAssembler()
    settled = {group_id_for(0, 0, 0)}
    assert a.add("2-0", sample(0, 0), settled) == (None, "2-0")
    assert a.open == {}


def test_group_size_one_completes_at_once():
    a = GroupAssembler()
    group, dup = a.add("3-0", sample(4, 0, group_size=1), set())
    assert group is not None and group.entry_ids == ["3-0"] and dup is None


def test_duplicate_of_a_completed_but_unsettled_group():
    a = GroupAssembler()
    a.add("1-0", sample(0, 0, group_size=2), set())
    group, _ = a.add("1-1", sample(0, 1, group_size=2), set())
    assert group is not None
    assert a.add("1-9", sample(0, 0, group_size=2), set()) == (None, "1-9")


# --------------------------------------------------------------------------- collate


def test_collate_alignment_and_right_padding():
    long = RolloutRecord(tokens=[5, 6, 7, 8], logprobs=[0, -1, -2, -3], loss_mask=[0, 0, 1, 1], reward=1.0)
    short = RolloutRecord(tokens=[9, 10], logprobs=[0, -0.5], loss_mask=[0, 1], reward=0.0)
    adv = torch.tensor([0.5, -0.5])
    b = collate([long, short], adv, pad_id=0, device=torch.device("cpu"))

    assert b.tokens_B_N.dtype == torch.long and b.tokens_B_N.shape == (2, 4)
    assert b.tokens_B_N.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert b.attention_B_N.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b.inf_logprobs_B_T.dtype == torch.float32 and b.inf_logprobs_B_T.shape == (2, 3)
    assert b.mask_B_T.dtype == torch.float32 and b.mask_B_T.shape == (2, 3)
    # position 0 dropped: logprob/mask at t predict token t+1
    assert b.inf_logprobs_B_T[0].tolist() == [-1.0, -2.0, -3.0]
    assert b.mask_B_T[0].tolist() == [0.0, 1.0, 1.0]
    assert b.inf_logprobs_B_T[1].tolist() == [-0.5, 0.0, 0.0]
    assert b.mask_B_T[1].tolist() == [1.0, 0.0, 0.0]  # padding never trained
    assert b.advantages_B.tolist() == [0.5, -0.5]


def test_collate_uses_pad_id_and_keeps_samples_intact():
    s1 = RolloutRecord(tokens=[3, 4, 5], logprobs=[0, -0.25, -0.75], loss_mask=[0, 1, 1], reward=1.0)
    s2 = RolloutRecord(tokens=[7, 8], logprobs=[0, -1.5], loss_mask=[0, 1], reward=0.0)
    b = collate([s2, s1], torch.zeros(2), pad_id=99, device=torch.device("cpu"))
    assert b.tokens_B_N.tolist() == [[7, 8, 99], [3, 4, 5]]
    assert b.inf_logprobs_B_T.tolist() == [[-1.5, 0.0], [-0.25, -0.75]]
    assert b.mask_B_T.tolist() == [[1.0, 0.0], [1.0, 1.0]]
    b.tokens_B_N.fill_(0)
    b.inf_logprobs_B_T.fill_(0)
    assert s1.tokens.tolist() == [3, 4, 5] and s1.logprobs.tolist() == [0, -0.25, -0.75]


def test_collate_large_token_ids():
    s = RolloutRecord(tokens=[2**31 - 1, 151_000], logprobs=[0, -1], loss_mask=[0, 1], reward=0.0)
    b = collate([s], torch.zeros(1), pad_id=0, device=torch.device("cpu"))
    assert b.tokens_B_N.tolist() == [[2**31 - 1, 151_000]]


# --------------------------------------------------------------------------- invalid members, oldest first


def test_dead_lettered_members_settle_their_group_at_once():
    a = GroupAssembler()
    gid = group_id_for(0, 0, 0)
    a.add("1-0", sample(0, 0), set())
    a.add_invalid(sample(0, 1), set())
    assert a.pop_stale(max_age_s=3600) == []  # one member still to come
    a.add_invalid(sample(0, 1), set())  # the same member again (a re-run job): counted once
    assert a.pop_stale(max_age_s=3600) == []
    a.add_invalid(sample(0, 2), set())
    (group,) = a.pop_stale(max_age_s=3600)
    assert group.group_id == gid and group.accounted_for and len(group.members) == 1 and len(group.invalid) == 2
    assert gid in a.completed


def test_a_group_whose_every_member_is_invalid_still_settles():
    a = GroupAssembler()
    for m in range(3):
        a.add_invalid(sample(0, m), set())
    (group,) = a.pop_stale(max_age_s=3600)
    assert group.members == {} and group.size == 3


def test_invalid_members_of_settled_or_completed_groups_are_ignored():
    a = GroupAssembler()
    a.add_invalid(sample(0, 0), {group_id_for(0, 0, 0)})
    a.completed.add(group_id_for(0, 1, 0))
    a.add_invalid(sample(1, 0), set())
    assert a.open == {}


def test_held_entry_ids_are_the_open_groups_entries():
    a = GroupAssembler()
    a.add("1-0", sample(0, 0), set())
    a.add("1-1", sample(1, 0), set())
    assert a.held_entry_ids() == {"1-0", "1-1"}


def test_take_oldest_prefers_the_oldest_submit_version_then_arrival():
    def group(row: int, version: int) -> Group:
        g = Group(group_id_for(0, row, 0), 1)
        g.members["s"] = (f"{row}-0", sample(row, 0, group_size=1, submit_version=version))
        return g

    ready = [group(0, 3), group(1, 1), group(2, 3), group(3, 2), group(4, 1)]
    taken, rest = take_oldest(ready, 3)
    assert [g.group_id for g in taken] == [ready[i].group_id for i in (1, 3, 4)]  # arrival order kept
    assert [g.group_id for g in rest] == [ready[i].group_id for i in (0, 2)]
    assert take_oldest(ready, 10) == (ready, [])
    assert Group("empty", 2).submit_version == 0
