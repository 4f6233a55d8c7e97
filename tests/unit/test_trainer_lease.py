"""rlstream.trainer.lease on fakeredis (tests/lease_cases.py holds the cases; the integration
suite runs them on the real redis-server too): take, renew, lose, release, stand by and take
over, the renewal thread, the fenced write; and the standby's log line."""
from __future__ import annotations

import logging

import lease_cases
from lease_cases import holder

from rlstream.core import keys
from rlstream.trainer.lease import TrainerLease


def test_take_renew_release(r, run_id):
    lease_cases.take_renew_release(r, run_id)


def test_a_second_trainer_is_refused(r, run_id):
    lease_cases.a_second_trainer_is_refused(r, run_id)


def test_a_lost_lease_stops_its_holder(r, run_id):
    lease_cases.a_lost_lease_stops_its_holder(r, run_id)


def test_fenced_writes_need_the_lease(r, run_id):
    lease_cases.fenced_writes_need_the_lease(r, run_id)


def test_a_standby_takes_over_when_the_lease_lapses(r, run_id):
    lease_cases.a_standby_takes_over_when_the_lease_lapses(r, run_id)


def test_a_standby_exits_when_the_run_finishes(r, run_id):
    lease_cases.a_standby_exits_when_the_run_finishes(r, run_id)


def test_the_renewal_thread_keeps_the_lease_and_notices_its_loss(r, run_id):
    lease_cases.the_renewal_thread_keeps_the_lease_and_notices_its_loss(r, run_id)


def test_a_standby_says_who_holds_the_lease(r, run_id, caplog):
    r.set(keys.trainer_lease(run_id), "host-1-dead", px=400)
    b = TrainerLease(r, run_id, token="trainer-b")
    with caplog.at_level(logging.INFO):
        assert b.acquire(poll_s=0.02, log_every_s=0.0)
    assert f"standing by: trainer host-1-dead holds run {run_id}'s trainer lease (expires in" in caplog.text
    assert f"took over run {run_id}'s trainer lease" in caplog.text
    assert holder(r, run_id) == "trainer-b"
    b.release()
