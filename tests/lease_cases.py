"""The trainer lease's cases (rlstream.trainer.lease; docs/design.md §15.36 A trainer lease
fences every trainer write), run on fakeredis by tests/unit/test_trainer_lease.py and on the
real redis-server by tests/integration/test_lease_redis.py: take, renew, lose, release, stand
by and take over, the renewal thread, and the fenced write. Importable as ``lease_cases``
from every test folder, like ``polling``."""
from __future__ import annotations

import pytest
from polling import wait_until

from rlstream.core import bus, keys
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import DatasetExhausted, RolloutRecord, RunFinished
from rlstream.trainer.lease import TrainerLease, fenced_write


def holder(r, run_id: str) -> str | None:
    token = r.get(keys.trainer_lease(run_id))
    return token.decode() if token is not None else None


def take_renew_release(r, run_id: str) -> None:
    key = keys.trainer_lease(run_id)
    a = TrainerLease(r, run_id, token="trainer-a")
    assert a.try_take() and a.held
    assert holder(r, run_id) == "trainer-a" and 0 < r.pttl(key) <= a.ttl_ms
    r.pexpire(key, 100)  # about to lapse
    assert a.renew()
    assert r.pttl(key) > 100
    a.release()
    assert holder(r, run_id) is None and not a.held
    b = TrainerLease(r, run_id, token="trainer-b")
    assert b.try_take()  # a successor starts at once
    b.release()


def a_second_trainer_is_refused(r, run_id: str) -> None:
    a, b = TrainerLease(r, run_id, token="trainer-a"), TrainerLease(r, run_id, token="trainer-b")
    assert a.try_take()
    assert not b.try_take()
    with pytest.raises(RlstreamError, match=f"run {run_id} already has a trainer: trainer-a holds"):
        b.hold()
    b.release()  # not its lease: nothing deleted
    assert holder(r, run_id) == "trainer-a"
    a.release()


def a_lost_lease_stops_its_holder(r, run_id: str) -> None:
    key = keys.trainer_lease(run_id)
    a = TrainerLease(r, run_id, token="trainer-a")
    assert a.try_take()
    r.set(key, "trainer-b")  # a's lease lapsed and trainer-b took over
    assert not a.renew()
    assert a.lost_to == "trainer-b" and not a.held
    with pytest.raises(RlstreamError, match=f"lost the trainer lease of run {run_id} to trainer-b: another trainer "
                                            "took over this run; this one stops"):
        a.check()
    with pytest.raises(RlstreamError, match="to trainer-b"):
        a.confirm()
    a.release()
    assert holder(r, run_id) == "trainer-b"  # never deletes another trainer's lease

    r.delete(key)
    c = TrainerLease(r, run_id, token="trainer-c")
    assert c.try_take()
    r.delete(key)  # it expired unrenewed (Redis unreachable for a TTL, the process paused)
    assert not c.renew()
    with pytest.raises(RlstreamError, match=f"lost the trainer lease of run {run_id}: it expired"):
        c.check()
    c.release()


def fenced_writes_need_the_lease(r, run_id: str) -> None:
    events, rollouts = keys.events(run_id), keys.rollouts(run_id)
    bus.ensure_group(r, rollouts)
    entry = bus.xadd(r, rollouts, RolloutRecord(tokens=[1, 2], logprobs=[0.0, -1.0], loss_mask=[0, 1], reward=1.0))
    r.xreadgroup(keys.TRAINER_GROUP, "trainer-0", {rollouts: ">"})
    a = TrainerLease(r, run_id, token="trainer-a")
    assert a.try_take()
    assert fenced_write(r, a, add=(events, DatasetExhausted(groups=1))) is not None
    r.set(keys.trainer_lease(run_id), "trainer-b")
    with pytest.raises(RlstreamError, match="lost the trainer lease .* to trainer-b"):
        fenced_write(r, a, add=(events, DatasetExhausted(groups=2)), ack=(rollouts, [entry.decode()]))
    assert r.xlen(events) == 1 and bus.group_info(r, rollouts)["pending"] == 1  # nothing written
    assert a.lost_to == "trainer-b"


def a_standby_takes_over_when_the_lease_lapses(r, run_id: str) -> None:
    r.set(keys.trainer_lease(run_id), "killed-trainer", px=300)  # a SIGKILLed trainer's lease, still live
    b = TrainerLease(r, run_id, token="trainer-b")
    assert b.acquire(poll_s=0.02) is True
    assert holder(r, run_id) == "trainer-b" and b.held
    b.release()


def a_standby_exits_when_the_run_finishes(r, run_id: str) -> None:
    r.set(keys.trainer_lease(run_id), "trainer-a", px=60_000)
    bus.xadd(r, keys.events(run_id), RunFinished(reason="max_steps", step=3, version=3))
    b = TrainerLease(r, run_id, token="trainer-b")
    assert b.acquire(poll_s=0.02) is False
    assert holder(r, run_id) == "trainer-a" and not b.held


def the_renewal_thread_keeps_the_lease_and_notices_its_loss(r, run_id: str) -> None:
    key = keys.trainer_lease(run_id)
    a = TrainerLease(r, run_id, ttl_s=3.0, token="trainer-a")  # renewed every second
    assert a.try_take()
    r.pexpire(key, 100_000)
    wait_until(lambda: 0 < r.pttl(key) <= 3000, 15, "the renewal thread to renew the lease")
    r.set(key, "trainer-b", px=100_000)
    wait_until(lambda: a.lost_to == "trainer-b", 15, "the renewal thread to notice the takeover")
    with pytest.raises(RlstreamError, match="to trainer-b"):
        a.check()
    a.release()
    assert holder(r, run_id) == "trainer-b"


CASES = [take_renew_release, a_second_trainer_is_refused, a_lost_lease_stops_its_holder,
         fenced_writes_need_the_lease, a_standby_takes_over_when_the_lease_lapses,
         a_standby_exits_when_the_run_finishes, the_renewal_thread_keeps_the_lease_and_notices_its_loss]
