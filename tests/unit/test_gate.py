"""rlstream.producers.gate (docs/design.md §5 Versions and the gate) with hand-computed
numbers, and the gate driven by a RunState folded from events, as the producer runs it."""
from __future__ import annotations

import random

import pytest

from rlstream.core.messages import (
    DatasetExhausted,
    GroupAdmitted,
    GroupRejected,
    RunFinished,
    StepCommitted,
    WeightsPublished,
    group_id_for,
)
from rlstream.core.run_state import RunState
from rlstream.producers.gate import can_admit, concurrency_capacity, staleness_capacity


def test_staleness_capacity_hand_computed():
    # (v + O + 1) * B - (accepted + reserved)
    assert staleness_capacity(0, 0, 16, 0) == 16
    assert staleness_capacity(0, 1, 16, 0) == 32
    assert staleness_capacity(2, 1, 16, 40) == 4 * 16 - 40 == 24
    assert staleness_capacity(3, 2, 8, 48) == 0
    assert staleness_capacity(0, 0, 8, 12) == -4  # over-reserved (e.g. a config change): closed


def test_concurrency_capacity():
    assert concurrency_capacity(None, 0) == float("inf")
    assert concurrency_capacity(None, 10**9) == float("inf")
    assert concurrency_capacity(10, 3) == 7
    assert concurrency_capacity(10, 10) == 0


def gate(G, *, v=0, O=0, B=8, reserved=0, C=None, in_flight=0):
    return can_admit(G, published_version=v, offpolicy_versions=O, batch_size=B,
                     accepted_plus_reserved=reserved, max_in_flight=C, in_flight=in_flight)


def test_can_admit_staleness_boundary():
    # B=8, O=0, v=0: capacity 8 - reserved
    assert gate(4, reserved=4)       # capacity 4 == G: admit
    assert not gate(4, reserved=5)   # capacity 3 == G-1: no
    assert gate(4, reserved=0)
    assert gate(4, v=1, reserved=12)      # 16 - 12 = 4
    assert not gate(4, v=1, reserved=13)
    assert gate(4, O=2, reserved=20)      # 24 - 20 = 4
    assert not gate(4, O=2, reserved=21)


def test_can_admit_concurrency_boundary():
    assert gate(4, B=1000, C=10, in_flight=6)       # 4 == G
    assert not gate(4, B=1000, C=10, in_flight=7)   # 3
    assert gate(4, B=1000, C=None, in_flight=10**6)


def test_can_admit_takes_the_minimum():
    assert not gate(4, B=8, reserved=5, C=100, in_flight=0)  # staleness binds
    assert not gate(4, B=100, reserved=0, C=8, in_flight=5)  # concurrency binds
    assert gate(4, B=8, reserved=4, C=8, in_flight=4)


@pytest.mark.parametrize("P,G", [(1, 2), (3, 4), (4, 8)])
def test_o0_admits_exactly_one_batch_per_version(P, G):
    B = P * G
    reserved = 0
    for v in range(4):
        admitted = 0
        while gate(G, v=v, O=0, B=B, reserved=reserved):
            reserved += G
            admitted += 1
        assert admitted == P
        assert reserved == (v + 1) * B


def test_o1_admits_two_batches_ahead_then_one_per_version():
    P, G = 2, 4
    B, reserved, per_version = P * G, 0, []
    for v in range(3):
        n = 0
        while gate(G, v=v, O=1, B=B, reserved=reserved):
            reserved += G
            n += 1
        per_version.append(n)
    assert per_version == [2 * P, P, P]


# --------------------------------------------------------------------------- RunState


def admitted(row, G=4, v=0, attempt=0, epoch=0):
    return GroupAdmitted(group_id=group_id_for(epoch, row, attempt), row_index=row, epoch=epoch,
                         attempt=attempt, submit_version=v, group_size=G)


def test_run_state_fold_counts():
    s = RunState()
    for row in range(3):
        s.apply(admitted(row))
    assert s.reserved_samples == 12 and s.in_flight_samples == 12
    assert [g.row_index for g in s.open_groups] == [0, 1, 2]
    assert s.rows_admitted == {(0, 0), (0, 1), (0, 2)}

    s.apply(StepCommitted(step=1, version=1, entry_ids=["1-0"], sample_ids=["x"],
                          group_ids=[group_id_for(0, 0, 0)]))
    assert s.reserved_samples == 12  # trained samples stay counted as accepted
    assert s.in_flight_samples == 8
    assert s.steps == 1 and s.published_version == 0  # not published yet

    s.apply(WeightsPublished(version=1, uri="u1", sha256="h", bytes=1))
    assert s.published_version == 1 and s.latest_weights.uri == "u1"
    s.apply(WeightsPublished(version=0, uri="u0", sha256="h", bytes=1))  # late/old: no regress
    assert s.published_version == 1 and s.latest_weights.uri == "u1"

    s.apply(GroupRejected(group_id=group_id_for(0, 1, 0), reason="job failed", by="producer"))
    assert s.reserved_samples == 8 and s.in_flight_samples == 4
    assert [g.row_index for g in s.open_groups] == [2]
    assert s.settled_groups == {group_id_for(0, 0, 0), group_id_for(0, 1, 0)}
    # a second rejection keeps the first reason
    s.apply(GroupRejected(group_id=group_id_for(0, 1, 0), reason="other"))
    assert s.rejected[group_id_for(0, 1, 0)] == "job failed"
    assert s.reserved_samples == 8

    # a retry of the rejected row is a new group (new attempt) and counts again
    s.apply(admitted(1, attempt=1))
    assert s.reserved_samples == 12 and s.in_flight_samples == 8

    s.apply(DatasetExhausted(groups=3))
    s.apply(RunFinished(reason="done", step=1, version=1))
    assert s.exhausted_groups == 3 and s.finished.reason == "done"


def test_rejected_group_frees_its_slots_for_the_gate():
    G, P, O = 4, 2, 0
    B = P * G
    s = RunState()

    def admit_all():
        n = 0
        while can_admit(G, published_version=s.published_version, offpolicy_versions=O, batch_size=B,
                        accepted_plus_reserved=s.reserved_samples, max_in_flight=None,
                        in_flight=s.in_flight_samples):
            s.apply(admitted(len(s.admitted), G, s.published_version))
            n += 1
        return n

    assert admit_all() == P
    assert admit_all() == 0
    s.apply(GroupRejected(group_id=group_id_for(0, 0, 0), reason="filtered"))
    assert admit_all() == 1  # exactly the freed group
    assert s.reserved_samples == B


def test_concurrency_gate_with_run_state():
    G, C = 4, 8
    s = RunState()

    def try_admit():
        ok = can_admit(G, published_version=s.published_version, offpolicy_versions=100, batch_size=1000,
                       accepted_plus_reserved=s.reserved_samples, max_in_flight=C,
                       in_flight=s.in_flight_samples)
        if ok:
            s.apply(admitted(len(s.admitted), G))
        return ok

    assert try_admit() and try_admit() and not try_admit()
    s.apply(StepCommitted(step=1, version=1, entry_ids=[], sample_ids=[], group_ids=[group_id_for(0, 0, 0)]))
    assert s.in_flight_samples == 4
    assert try_admit() and not try_admit()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("O", [0, 1, 3])
def test_simulation_staleness_bound(seed, O):
    """Producer admits under the gate, a FIFO trainer takes P groups per step, some open
    groups get rejected at random: every trained group is trained by weights at most O
    versions newer than its submit version, and exactly B samples per step."""
    rng = random.Random(seed)
    G, P = 3, 2
    B = P * G
    s = RunState()
    row = 0
    trained_offsets = []
    for step in range(1, 25):
        # producer
        while can_admit(G, published_version=s.published_version, offpolicy_versions=O, batch_size=B,
                        accepted_plus_reserved=s.reserved_samples, max_in_flight=None,
                        in_flight=s.in_flight_samples):
            s.apply(admitted(row, G, s.published_version))
            row += 1
        assert s.reserved_samples <= (s.published_version + O + 1) * B
        # random rejections of open groups
        for g in list(s.open_groups):
            if rng.random() < 0.15:
                s.apply(GroupRejected(group_id=g.group_id, reason="filtered"))
        # refill after rejections (still at the same version)
        while can_admit(G, published_version=s.published_version, offpolicy_versions=O, batch_size=B,
                        accepted_plus_reserved=s.reserved_samples, max_in_flight=None,
                        in_flight=s.in_flight_samples):
            s.apply(admitted(row, G, s.published_version))
            row += 1
        # trainer: FIFO, one batch of P groups with the weights of version step-1
        batch = s.open_groups[:P]
        assert len(batch) == P, "the gate must always leave a full batch to train"
        trained_offsets += [(step - 1) - g.submit_version for g in batch]
        s.apply(StepCommitted(step=step, version=step, entry_ids=[], sample_ids=[],
                              group_ids=[g.group_id for g in batch]))
        s.apply(WeightsPublished(version=step, uri=f"v{step}", sha256="h", bytes=0))
        assert s.reserved_samples - s.in_flight_samples == step * B  # accepted = trained batches
    assert max(trained_offsets) <= O
    assert min(trained_offsets) >= 0
    if O > 0:
        assert max(trained_offsets) == O  # the gate does let sampling run O versions ahead
