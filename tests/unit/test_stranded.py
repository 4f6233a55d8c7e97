"""producers.stranded.JobWatch: which open, unsampled groups' jobs are overdue for a
re-dispatch, on an explicit clock (no sleeping)."""
from __future__ import annotations

import logging

from rlstream.core.jobs import JobPlace
from rlstream.producers.stranded import STRANDED_GRACE_S, JobWatch, started_bound_s

QUEUED = JobPlace(exists=True, status="queued", queued=True, dequeued=False, started=False, failed=False)
STARTED = JobPlace(exists=True, status="started", queued=False, dequeued=False, started=True, failed=False)
FAILED = JobPlace(exists=True, status="failed", queued=False, dequeued=False, started=False, failed=True)
TAKEN = JobPlace(exists=True, status="queued", queued=False, dequeued=True, started=False, failed=False)
NOWHERE = JobPlace(exists=True, status="failed", queued=False, dequeued=False, started=False, failed=False)


def test_a_job_out_of_every_live_place_is_overdue_after_the_grace():
    watch = JobWatch(job_timeout=20)
    assert watch.overdue({"g": TAKEN, "h": NOWHERE}, 0.0) == {}
    assert watch.overdue({"g": TAKEN, "h": NOWHERE}, STRANDED_GRACE_S - 1) == {}
    overdue = watch.overdue({"g": TAKEN, "h": NOWHERE}, STRANDED_GRACE_S)
    assert set(overdue) == {"g", "h"}
    assert "intermediate queue" in overdue["g"] and "in no queue or registry" in overdue["h"]
    assert watch.overdue({"g": TAKEN}, STRANDED_GRACE_S + 1) == {}  # its clock restarted with the re-dispatch


def test_moving_on_resets_the_clock():
    watch = JobWatch(job_timeout=20)
    watch.overdue({"g": TAKEN}, 0.0)
    watch.overdue({"g": STARTED}, 5.0)  # the worker started it after all
    assert watch.overdue({"g": NOWHERE}, 10.0) == {}
    assert watch.overdue({"g": NOWHERE}, 10.0 + STRANDED_GRACE_S) != {}


def test_a_job_started_for_too_long_is_overdue():
    watch = JobWatch(job_timeout=20)
    bound = started_bound_s(20)
    assert watch.overdue({"g": STARTED}, 0.0) == {}
    assert watch.overdue({"g": STARTED}, bound) == {}
    assert "ran for" in watch.overdue({"g": STARTED}, bound + 1)["g"]


def test_queued_and_failed_jobs_are_never_overdue_and_a_long_wait_is_logged_once(caplog):
    watch = JobWatch(job_timeout=20)
    with caplog.at_level(logging.WARNING):
        for t in (0.0, 100.0, 200.0, 10_000.0):
            assert watch.overdue({"q": QUEUED, "f": FAILED}, t) == {}
    assert sum("waited" in r.getMessage() for r in caplog.records) == 1


def test_groups_that_left_are_forgotten():
    watch = JobWatch(job_timeout=20)
    watch.overdue({"g": NOWHERE}, 0.0)
    watch.overdue({}, 1.0)  # sampled or settled meanwhile
    assert watch.overdue({"g": NOWHERE}, STRANDED_GRACE_S) == {}
