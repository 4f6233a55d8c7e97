"""Every reader of the events stream settles the same groups (docs/design.md §15.98 A written group
is the trainer's to settle): on random logs of admissions, writes, rejections by the trainer, a
worker, the producer or no named writer, and steps, the fold, a fold resumed from a snapshot taken at
any step, the trainer's own view (it folds its rejections as it writes them, ahead of the log), the
audit and the metrics exporter agree with a reference written from the rule's words, not its code."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from rlstream.core import bus, fold_snapshot, keys
from rlstream.core.config import Config
from rlstream.core.messages import GroupAdmitted, GroupRejected, GroupSampled, Message, StepCommitted, group_id_for
from rlstream.core.run_state import RunState
from rlstream.ops import metrics_exporter as mx
from rlstream.ops.audit import audit_ledger

RUN = "rule"
WRITERS = ["trainer", "host-1234", "producer", ""]
REASONS = ["stale: sampled with v0", "rollout job failed: x", "incomplete: 1 of 2", "only 0 of 2 draws returned",
           "job lost; re-dispatched 3 times already", "my filter said no"]


def random_log(seed: int, n: int = 250) -> list[Message]:
    rng, step, admitted, events = random.Random(seed), 0, [], []
    for i in range(n):
        action = rng.random()
        if action < 0.3 or not admitted:
            gid = group_id_for(0, len(admitted), 0)
            admitted.append(gid)
            events.append(GroupAdmitted(group_id=gid, row_index=len(admitted) - 1, epoch=0, attempt=0,
                                        submit_version=0, group_size=rng.choice([2, 4])))
        elif action < 0.5:
            events.append(GroupSampled(group_id=rng.choice(admitted), samples=2, tokens=3))
        elif action < 0.8:
            events.append(GroupRejected(group_id=rng.choice(admitted), reason=rng.choice(REASONS) + f" #{i}",
                                        by=rng.choice(WRITERS)))
        else:
            step += 1
            events.append(StepCommitted(step=step, version=step, entry_ids=[], sample_ids=[],
                                        group_ids=rng.sample(admitted, k=min(len(admitted), rng.randint(1, 2)))))
    return events


def reference(events: list[Message]) -> tuple[dict[str, str], set[str]]:
    """(group id -> the reason of the rejection that settles it, trained group ids), from the rule as
    docs/design.md §15.98 A written group is the trainer's to settle words it: the first rejection of a
    group counts, unless its GroupSampled came before it and the trainer did not write it (a rejection
    naming no writer counts)."""
    rejected: dict[str, str] = {}
    sampled: set[str] = set()
    trained: set[str] = set()
    for m in events:
        if isinstance(m, GroupSampled):
            sampled.add(m.group_id)
        elif isinstance(m, StepCommitted):
            trained.update(m.group_ids)
        elif isinstance(m, GroupRejected) and m.group_id not in rejected:
            if m.group_id not in sampled or m.by in ("trainer", ""):
                rejected[m.group_id] = m.reason
    return rejected, trained


def fold(events: list[Message], state: RunState | None = None) -> RunState:
    state = RunState() if state is None else state
    for m in events:
        state.apply(m)
    return state


def settled_view(s: RunState) -> dict:
    return {"settled": set(s.settled_groups), "rejected": set(s.rejected), "open": [g.group_id for g in s.open_groups],
            "reserved": s.reserved_samples, "in_flight": s.in_flight_samples, "trained": s.trained_samples,
            "unsampled": [g.group_id for g in s.unsampled_groups]}


@pytest.mark.parametrize("seed", range(30))
def test_the_fold_follows_the_rule(seed):
    events = random_log(seed)
    rejected, trained = reference(events)
    s = fold(events)
    assert s.rejected == rejected and list(s.rejected) == s.rejected_order == list(rejected)
    assert s.trained == trained
    assert s.reserved_samples == sum(m.group_size for m in events
                                     if isinstance(m, GroupAdmitted) and m.group_id not in rejected)


@pytest.mark.parametrize("seed", range(30))
def test_a_fold_resumed_from_a_snapshot_at_any_step_is_the_fold_of_the_whole_log(seed):
    events = random_log(seed)
    whole = fold(events)
    cuts = [i + 1 for i, m in enumerate(events) if isinstance(m, StepCommitted)]
    for cut in cuts:
        snap = fold_snapshot.load(fold_snapshot.dump(fold(events[:cut]), cursor="1-0", commit_id="1-0", step=1,
                                                     metrics_bytes=0))
        resumed = fold(events[cut:], snap.state)
        # (the snapshot keeps trained groups sorted: their order is read only for what is new since)
        assert {**vars(resumed), "trained_order": None} == {**vars(whole), "trained_order": None}


@pytest.mark.parametrize("seed", range(30))
def test_the_trainer_folding_its_own_rejections_ahead_of_the_log_settles_the_same_groups(seed):
    """``RolloutBuffer.reject`` applies the trainer's GroupRejected as it writes it, before the
    events ahead of it in the log (its samples are read before the events are followed)."""
    rng, events = random.Random(seed), random_log(seed)
    view: list[Message] = []
    for m in events:
        if isinstance(m, GroupRejected) and m.by == "trainer" and view:
            view.insert(rng.randint(max(0, len(view) - 8), len(view)), m)  # written while the fold lagged
        else:
            view.append(m)
    trainer, whole = fold(view), fold(events)
    for m in events:  # ... and then reads its own rejection back from the log: a no-op
        if isinstance(m, GroupRejected) and m.by == "trainer":
            trainer.apply(m)
    assert settled_view(trainer) == settled_view(whole)


@pytest.mark.parametrize("seed", range(30))
def test_the_audit_counts_what_the_fold_settles(seed):
    events = random_log(seed)
    rejected, trained = reference(events)
    report = audit_ledger(events, [], lambda _: True)
    assert report.rejected == len(set(rejected) - trained)
    assert report.rejected_after_training == sorted(set(rejected) & trained)
    admitted = {m.group_id for m in events if isinstance(m, GroupAdmitted)}
    assert sorted(report.in_flight) == sorted(admitted - trained - set(rejected)) and report.lost == []
    assert sum(report.rejected_reasons.values()) == report.rejected


@pytest.mark.parametrize("seed", range(8))
def test_the_metrics_exporter_counts_the_rejections_the_fold_takes(r, tmp_path, seed):
    events = random_log(seed, n=120)
    rejected, _ = reference(events)
    cut = next((i + 1 for i, m in enumerate(events) if isinstance(m, StepCommitted)), 0)
    ids = [bus.as_text(bus.xadd(r, keys.events(RUN), m)) for m in events]
    if cut:  # the exporter starts from the snapshot of the first step, as after a checkpoint
        (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
        (tmp_path / "checkpoints" / "step-1" / fold_snapshot.FOLD_FILE).write_text(fold_snapshot.dump(
            fold(events[:cut]), cursor=ids[cut - 1], commit_id=ids[cut - 1], step=1, metrics_bytes=0))
    collector = mx.RunCollector(Config(run_id=RUN), r, tmp_path)
    collector._fold(mx._Families(RUN), deadline=float("inf"))
    assert collector.caught_up
    assert +collector.rejected == +Counter(mx.reject_class(reason) for reason in rejected.values())
