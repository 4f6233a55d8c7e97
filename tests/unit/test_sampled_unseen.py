"""A group a worker reported sampled (GroupSampled) none of whose entries decodes at the
trainer would stay open forever, and with O = 0 the gate would wait for it forever
(docs/design.md §15.35 A sampled group that never arrives is rejected). The trainer rejects it,
naming it, once it has noticed it for 2 × job_timeout and a read has caught up since. On
fakeredis, with the buffer's clock in the test's hands."""
from __future__ import annotations

import types

import pytest
from factories import config, sample

from rlstream.core import bus, keys
from rlstream.core.messages import GroupAdmitted, GroupSampled, RolloutRecord, group_id_for
from rlstream.trainer import buffer
from rlstream.trainer.batch import Group, overdue_unseen
from rlstream.trainer.trainer import Trainer

RUN = "un"
pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group
TIMEOUT = 5  # job_timeout: the limit is 2 x 5 s


@pytest.fixture
def clock(monkeypatch):
    """The buffer's monotonic clock, advanced by hand."""
    now = [1000.0]
    monkeypatch.setattr(buffer, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    return now


def admit(r, row: int) -> str:
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0, submit_version=0,
                                                    group_size=2))
    return gid


def sampled(r, gid: str, entries: list[bytes | RolloutRecord]) -> None:
    """What a worker's MULTI writes: the entries, then GroupSampled."""
    for entry in entries:
        if isinstance(entry, bytes):
            r.xadd(keys.rollouts(RUN), {"m": entry})
        else:
            bus.xadd(r, keys.rollouts(RUN), entry)
    bus.xadd(r, keys.events(RUN), GroupSampled(group_id=gid, samples=len(entries), worker_id="w", version=0))


def trainer(r, tmp_path) -> Trainer:
    cfg = config(tmp_path, run_id=RUN, job_timeout=TIMEOUT, max_head_offpolicy_versions=0)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    return t


def test_a_sampled_group_whose_entries_never_decode_is_rejected_naming_it(r, tmp_path, clock):
    lost = admit(r, 0)
    sampled(r, lost, [b"\x00garbage", b"\xc1"])  # neither decodes: dead-lettered without a group id
    waiting = admit(r, 1)
    sampled(r, waiting, [sample(1, 0)])  # one member here, the other still coming: not this rule's
    t = trainer(r, tmp_path)
    t.buffer.collect()
    assert r.xlen(keys.dead(RUN)) == 2
    clock[0] += 2 * TIMEOUT - 1
    t.buffer.collect()
    assert lost not in t.state.rejected  # not yet
    clock[0] += 2
    t.buffer.collect()
    reason = t.state.rejected[lost]
    assert lost in reason and "GroupSampled" in reason and f"{2 * TIMEOUT}s" in reason
    assert waiting not in t.state.rejected
    assert [g.group_id for g in t.state.open_groups] == [waiting]  # the gate's slots are freed
    assert t.state.in_flight_samples == 2


def test_noticed_late_means_judged_late(r, tmp_path, clock):
    """The clock starts when the trainer notices the group (here: a restarted trainer)."""
    lost = admit(r, 0)
    clock[0] += 100 * TIMEOUT  # the GroupSampled is old, but this trainer has only just seen it
    sampled(r, lost, [b"\x00garbage"])
    t = trainer(r, tmp_path)
    t.buffer.collect()
    assert lost not in t.state.rejected
    clock[0] += 2 * TIMEOUT + 1
    t.buffer.collect()
    assert lost in t.state.rejected


def test_only_a_read_that_caught_up_since_judges_a_group():
    """Its entries may just be unread (a backlog longer than one read): not overdue then."""
    waiting, overdue = overdue_unseen({"g": 10.0}, ["g", "h"], now=100.0, limit_s=10.0, caught_up_at=5.0)
    assert (waiting, overdue) == ({"g": 10.0, "h": 100.0}, [])
    waiting, overdue = overdue_unseen({"g": 10.0}, ["g", "h"], now=100.0, limit_s=10.0, caught_up_at=50.0)
    assert (waiting, overdue) == ({"h": 100.0}, ["g"])
    assert overdue_unseen({"g": 10.0}, [], now=100.0, limit_s=10.0, caught_up_at=50.0) == ({}, [])  # it arrived


class MembershipOnly:
    """The groups handed out so far, as a container the buffer may ask ``in`` of and add to, but
    not walk or copy (no ``__iter__``: a union or a loop raises): they grow with the run (320,000
    after 10,000 steps of 32 groups), and a read that walked them cost O(run length)."""

    def __init__(self, ids):
        self.ids = set(ids)

    def __contains__(self, group_id) -> bool:
        return group_id in self.ids

    def add(self, group_id) -> None:
        self.ids.add(group_id)

    def difference_update(self, group_ids) -> None:
        self.ids.difference_update(group_ids)


def test_a_read_asks_about_the_groups_handed_out_and_never_walks_them(r, tmp_path, clock):
    lost = admit(r, 0)
    sampled(r, lost, [b"\x00garbage", b"\xc1"])
    t = trainer(r, tmp_path)
    t.buffer.assembler.completed = MembershipOnly({f"old-{i}" for i in range(3)})
    t.buffer.collect()
    clock[0] += 2 * TIMEOUT + 1
    t.buffer.collect()
    assert lost in t.state.rejected  # the check still ran, on membership alone


def test_handed_out_groups_are_forgotten_once_settled_and_their_samples_still_refused(r, tmp_path, clock):
    """``completed`` keeps only groups handed out and not yet settled (docs/design.md §15.91 A step's
    bookkeeping does not grow with the run): once the fold has the step that trained a group, or
    its rejection, the group leaves it, and a sample of it delivered again is still acked as a
    duplicate (the fold's settled set answers), never trained."""
    trained, rejected = admit(r, 0), admit(r, 1)
    sampled(r, trained, [sample(0, 0), sample(0, 1)])
    t = trainer(r, tmp_path)
    t.buffer.collect()
    groups = t.buffer.take(1, t.version)
    assert [g.group_id for g in groups] == [trained] and trained in t.buffer.assembler.completed
    t.buffer.reject(t.buffer.assembler.open.pop(rejected, None) or Group(rejected, 2), "test: rejected")
    t.train_step(groups, wait_time=0.0)
    assert trained in t.buffer.assembler.completed  # committed, but not yet folded: still needed
    t.buffer.collect()  # folds the step's StepCommitted
    assert t.buffer.assembler.completed == set() and {trained, rejected} <= t.state.settled_groups
    bus.xadd(r, keys.rollouts(RUN), sample(0, 1))  # a re-run job delivers a trained member again
    t.buffer.collect()
    assert t.buffer.assembler.open == {} and t.buffer.ready == []
    assert r.xpending(keys.rollouts(RUN), keys.TRAINER_GROUP)["pending"] == 0  # acked, untrained


def test_a_group_rejected_elsewhere_while_open_is_not_kept_once_the_trainer_gives_up_on_it(r, tmp_path):
    """A group rejected by another process (a producer's GroupRejected) while one of its members
    waited in the buffer: the trainer's own rejection of it, once stale, folds as a no-op, and the
    group must still leave ``completed`` (docs/design.md §15.91 A step's bookkeeping does not grow
    with the run)."""
    from rlstream.core.messages import GroupRejected

    gid = admit(r, 0)
    t = trainer(r, tmp_path)
    bus.xadd(r, keys.rollouts(RUN), sample(0, 0))  # one of two members
    t.buffer.collect()
    assert gid in t.buffer.assembler.open
    bus.xadd(r, keys.events(RUN), GroupRejected(group_id=gid, reason="job failed", by="producer"))
    t.buffer.collect()
    assert gid in t.state.rejected and gid in t.buffer.assembler.open
    t.buffer.assembler.open[gid].first_seen -= 2 * TIMEOUT + 1  # (the assembler's own clock)
    t.buffer.collect()  # stale: rejected again by the trainer, which the fold keeps as the first
    assert gid not in t.buffer.assembler.open and gid not in t.buffer.assembler.completed


@pytest.mark.parametrize("by", ["host-1234", "producer"])
def test_a_written_group_rejected_afterwards_by_another_is_still_the_trainers(r, tmp_path, clock, by):
    """A later run of its job (or the producer) rejects a group a worker already wrote: void
    (docs/design.md §15.98 A written group is the trainer's to settle). The trainer trains a group whose
    samples are here, read before or after the rejection (a restarted trainer: from its pending list),
    and rejects itself one whose samples were all dead-lettered: none stays open."""
    from rlstream.core.messages import GroupRejected

    ready, pending, dead = admit(r, 0), admit(r, 1), admit(r, 2)
    sampled(r, ready, [sample(0, 0), sample(0, 1)])
    t = trainer(r, tmp_path)
    t.buffer.collect()  # complete and scored before the rejection is written
    sampled(r, pending, [sample(1, 0), sample(1, 1)])
    sampled(r, dead, [sample(2, 0, tokens=(1, 99, 3)), sample(2, 1, tokens=(1, 99, 3))])  # outside the vocabulary
    t.buffer.follow_events()
    for gid in (ready, pending, dead):
        bus.xadd(r, keys.events(RUN), GroupRejected(group_id=gid, reason="only 0 of 2 draws returned", by=by))
    t.buffer.collect()
    t.lease.release()
    t = trainer(r, tmp_path)  # restarted: the fold voids the rejections again, the pending list holds the samples
    t.buffer.collect()
    assert not {ready, pending} & set(t.state.rejected) and t.state.rejected[dead].startswith("incomplete")
    assert sorted(g.group_id for g in t.buffer.ready) == [ready, pending]  # the next step trains them
    assert sorted(g.group_id for g in t.state.open_groups) == [ready, pending]
