"""rlstream.trainer.lease on fakeredis (tests/lease_cases.py holds the cases; the integration
suite runs them on the real redis-server too): take, renew, lose, release, stand by and take
over, the renewal thread, the fenced write; and the standby's log line."""
from __future__ import annotations

import logging

import lease_cases
import pytest
from lease_cases import holder

from rlstream.core import keys
from rlstream.trainer.lease import TrainerLease


@pytest.mark.parametrize("case", lease_cases.CASES, ids=lambda case: case.__name__)
def test_lease_case(r, run_id, case):
    case(r, run_id)


def test_a_standby_says_who_holds_the_lease(r, run_id, caplog):
    r.set(keys.trainer_lease(run_id), "host-1-dead", px=400)
    b = TrainerLease(r, run_id, token="trainer-b")
    with caplog.at_level(logging.INFO):
        assert b.acquire(poll_s=0.02, log_every_s=0.0)
    assert f"standing by: trainer host-1-dead holds run {run_id}'s trainer lease (expires in" in caplog.text
    assert f"took over run {run_id}'s trainer lease" in caplog.text
    assert holder(r, run_id) == "trainer-b"
    b.release()
