"""RunState keeps its aggregates incrementally: on any event order the workers, producer
and trainer can produce (re-delivered events included), they equal a recomputation from
the raw sets."""
from __future__ import annotations

import random

import pytest

from rlstream.core.messages import GroupAdmitted, GroupRejected, GroupSampled, StepCommitted, group_id_for
from rlstream.core.run_state import RunState


def recomputed(s: RunState) -> dict:
    settled = s.trained | set(s.rejected)
    open_groups = [g for gid, g in s.admitted.items() if gid not in settled]
    return {
        "settled": settled,
        "open": [g.group_id for g in open_groups],
        "reserved": sum(g.group_size for gid, g in s.admitted.items() if gid not in s.rejected),
        "in_flight": sum(g.group_size for g in open_groups),
        "trained_samples": sum(g.group_size for gid, g in s.admitted.items() if gid in s.trained),
        "unsampled": [g.group_id for g in open_groups if g.group_id not in s.sampled],
    }


def incremental(s: RunState) -> dict:
    return {"settled": set(s.settled_groups), "open": [g.group_id for g in s.open_groups],
            "reserved": s.reserved_samples, "in_flight": s.in_flight_samples,
            "trained_samples": s.trained_samples, "unsampled": [g.group_id for g in s.unsampled_groups]}


@pytest.mark.parametrize("seed", range(20))
def test_aggregates_match_a_recomputation_after_every_event(seed):
    """The aggregates against the fold's own sets (tests/unit/test_rejection_rule.py checks those sets
    against the rule, and every other reader against them)."""
    rng, s, step = random.Random(seed), RunState(), 0
    admitted: list[str] = []
    for i in range(300):
        action = rng.random()
        if action < 0.35 or not admitted:
            gid = group_id_for(0, len(admitted), 0)
            admitted.append(gid)
            event = GroupAdmitted(group_id=gid, row_index=len(admitted) - 1, epoch=0, attempt=0, submit_version=0,
                                  group_size=rng.choice([2, 4, 8]))
        elif action < 0.5:
            event = GroupSampled(group_id=rng.choice(admitted), samples=2)
        elif action < 0.65:  # by a worker, the producer or the trainer; possibly twice, possibly trained
            event = GroupRejected(group_id=rng.choice(admitted), reason=f"r{i}",
                                  by=rng.choice(["worker-1", "producer", "trainer", ""]))
        else:
            step += 1
            event = StepCommitted(step=step, version=step, entry_ids=[], sample_ids=[],
                                  group_ids=rng.sample(admitted, k=min(len(admitted), rng.randint(1, 3))))
        s.apply(event)
        if rng.random() < 0.1:
            s.apply(event)  # a re-delivered or retried event
        assert incremental(s) == recomputed(s)


@pytest.mark.parametrize("by, stands", [("worker-2", False), ("producer", False), ("trainer", True), ("", True)])
def test_once_written_a_group_is_settled_by_the_trainer_only(by, stands):
    """After its GroupSampled a group's rejection counts only if the trainer wrote it (or it names no
    writer, which no rlstream process writes). A later run of its job that failed, or the producer racing
    a hung run's write, leaves it open for the trainer to train (docs/design.md §15.98 A written group is
    the trainer's to settle); before its GroupSampled anyone's rejection settles it."""
    gid = group_id_for(0, 0, 0)
    s = RunState()
    s.apply(GroupAdmitted(group_id=gid, row_index=0, epoch=0, attempt=0, submit_version=0, group_size=4))
    s.apply(GroupSampled(group_id=gid, samples=4))
    s.apply(GroupRejected(group_id=gid, reason="r", by=by))
    assert (gid in s.rejected, s.reserved_samples, len(s.open_groups)) == ((True, 0, 0) if stands else (False, 4, 1))
    early = RunState()
    early.apply(GroupAdmitted(group_id=gid, row_index=0, epoch=0, attempt=0, submit_version=0, group_size=4))
    early.apply(GroupRejected(group_id=gid, reason="r", by=by))
    early.apply(GroupSampled(group_id=gid, samples=4))
    assert gid in early.rejected and early.reserved_samples == 0
