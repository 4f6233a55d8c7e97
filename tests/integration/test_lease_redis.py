"""rlstream.trainer.lease against a real redis-server (the cases are tests/lease_cases.py,
also run on fakeredis): the Lua scripts on Redis 6.2, and the server's own expiry deciding
when a standby takes over."""
from __future__ import annotations

import lease_cases
import pytest

pytestmark = pytest.mark.integration


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
