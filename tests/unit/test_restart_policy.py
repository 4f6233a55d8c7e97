"""The supervisor's restart policy (rlstream/restart_policy.py): a crash loop ends the run, separate
incidents never do, however many over the run's life."""
from __future__ import annotations

import pytest

from rlstream.core.errors import RunFailed
from rlstream.restart_policy import BACKOFF_CAP_S, MAX_RESTARTS, MIN_UPTIME_S, RestartPolicy


def test_quick_crashes_in_a_row_end_the_run_with_the_thresholds_named():
    policy = RestartPolicy("worker-0", started_at=0.0)
    delays = []
    for n in range(MAX_RESTARTS):
        delays.append(policy.crashed(steps=0, what="exited with code 1", now=1.0))
        policy.started(steps=0, now=2.0)
    assert delays == [1.0, 2.0, 4.0]
    with pytest.raises(RunFailed, match=r"worker-0 exited with code 1: a crash loop, 4 crashes in a row each within "
                                        r"60s of its start.*RLSTREAM_MAX_RESTARTS=3, RLSTREAM_MIN_UPTIME_S=60"):
        policy.crashed(steps=0, what="exited with code 1", now=3.0)


def test_crashes_spread_over_a_long_run_never_end_it():
    """The chaos run of issue 23 ended on Redis's fourth crash, hours apart: a lifetime count."""
    policy, now = RestartPolicy("the embedded redis-server", started_at=0.0), 0.0
    for crash in range(50):
        now += MIN_UPTIME_S + 1  # up for more than the minimum, no step needed
        assert policy.crashed(steps=0, what="died", now=now) == 1.0
        policy.started(steps=0, now=now)
    assert policy.restarts == 50 and policy.quick_crashes == 0


def test_a_step_committed_since_the_start_makes_a_quick_crash_a_new_incident():
    """Killed every few seconds while the run goes on (a chaos test): progress in between."""
    policy = RestartPolicy("trainer", started_at=0.0)
    for step in range(1, 20):
        assert policy.crashed(steps=step, what="exited with code -9", now=step + 0.5) == 1.0
        policy.started(steps=step, now=step + 1.0)
    assert policy.quick_crashes == 0


def test_an_incident_starts_the_count_again_and_the_backoff_is_capped():
    policy = RestartPolicy("producer", started_at=0.0)
    for _ in range(MAX_RESTARTS):
        policy.crashed(steps=0, what="exited", now=0.1)
    policy.started(steps=0, now=100.0)
    policy.crashed(steps=0, what="exited", now=100.0 + MIN_UPTIME_S + 1)
    assert policy.quick_crashes == 0
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLSTREAM_MAX_RESTARTS", "100")
        policy.started(steps=0, now=200.0)
        delays = [policy.crashed(steps=0, what="exited", now=200.5) for _ in range(20)]
    assert max(delays) == BACKOFF_CAP_S and delays == sorted(delays)


def test_a_server_that_never_came_up_crashed_quickly_whatever_its_uptime():
    policy = RestartPolicy("engine-0", started_at=0.0)
    policy.crashed(steps=0, what="did not answer", now=10 * MIN_UPTIME_S, came_up=False)
    assert policy.quick_crashes == 1
