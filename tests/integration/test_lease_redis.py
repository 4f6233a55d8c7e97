"""rlstream.trainer.lease against a real redis-server (the cases are tests/lease_cases.py,
also run on fakeredis): the Lua scripts on Redis 6.2, and the server's own expiry deciding
when a standby takes over."""
from __future__ import annotations

import lease_cases
import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("case", lease_cases.CASES, ids=lambda case: case.__name__)
def test_lease_case(r, run_id, case):
    case(r, run_id)
