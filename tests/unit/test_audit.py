"""rlstream.ops.audit.audit_ledger on synthetic messages: each definition and exit condition."""
from __future__ import annotations

from factories import sample

from rlstream.core.messages import GroupAdmitted, GroupRejected, StepCommitted, group_id_for, sample_id_for
from rlstream.ops.audit import AuditReport, audit_ledger

G = 2


def gid(row: int, attempt: int = 0) -> str:
    return group_id_for(0, row, attempt)


def admitted(row: int, attempt: int = 0) -> GroupAdmitted:
    return GroupAdmitted(group_id=gid(row, attempt), row_index=row, epoch=0, attempt=attempt,
                         submit_version=0, group_size=G)


def step(n: int, *group_ids: str, entries: list[str] | None = None, samples: list[str] | None = None) -> StepCommitted:
    sample_ids = samples if samples is not None else [sample_id_for(g, m) for g in group_ids for m in range(G)]
    entry_ids = entries if entries is not None else [f"{n}000-{i}" for i in range(len(sample_ids))]
    return StepCommitted(step=n, version=n, entry_ids=entry_ids, sample_ids=sample_ids, group_ids=list(group_ids))


def rejected(group_id: str, reason: str = "rollout job failed") -> GroupRejected:
    return GroupRejected(group_id=group_id, reason=reason, by="producer")


def no_job(_: GroupAdmitted) -> bool:
    return False


def audit(events, samples=(), job_exists=no_job) -> AuditReport:
    return audit_ledger(list(events), list(samples), job_exists)


def result_line(report: AuditReport) -> str:
    return report.lines()[-1]


def test_empty_ledger_is_clean():
    report = audit([])
    assert report.ok and report.steps == 0 and report.first_step is None
    assert report.missing_steps == [] and report.duplicate_steps == []
    assert result_line(report) == "result: ok"
    assert "steps: 0" in report.lines()


def test_clean_run():
    events = [admitted(0), admitted(1), admitted(2), step(1, gid(0), gid(1)), step(2, gid(2))]
    report = audit(events)
    assert report.ok, report.failures
    assert (report.admitted, report.trained, report.rejected, report.lost, report.in_flight) == (3, 3, 0, [], [])
    assert (report.steps, report.first_step, report.last_step) == (2, 1, 2)
    assert report.samples_trained == 6 and report.trained_twice == 0
    lines = report.lines()
    assert "groups_admitted: 3" in lines and "groups_trained: 3" in lines and "samples_trained: 6" in lines
    assert all(": " in line for line in lines)


def test_lost_group_fails():
    report = audit([admitted(0), admitted(1), step(1, gid(0))])
    assert report.lost == [gid(1)] and not report.ok
    assert result_line(report).startswith("result: FAILED: lost groups (1)")
    assert any(line.startswith("groups_lost: 1") and gid(1) in line for line in report.lines())


def test_in_flight_by_job():
    asked = []

    def job_exists(group: GroupAdmitted) -> bool:
        asked.append(group.group_id)
        return group.group_id == gid(1)

    report = audit([admitted(0), admitted(1), step(1, gid(0))], job_exists=job_exists)
    assert report.in_flight == [gid(1)] and report.in_flight_by_job == 1 and report.lost == []
    assert report.ok
    assert asked == [gid(1)]  # asked only about open groups


def test_in_flight_by_sample():
    report = audit([admitted(0), admitted(1), step(1, gid(0))], samples=[sample(1, 1)])
    assert report.in_flight == [gid(1)] and report.in_flight_by_sample == 1 and report.lost == []
    assert report.ok


def test_samples_of_other_groups_are_no_trace():
    report = audit([admitted(0), admitted(1)], samples=[sample(0)])
    assert report.in_flight == [gid(0)] and report.lost == [gid(1)]


def test_trained_twice_by_group():
    report = audit([admitted(0), step(1, gid(0), samples=["x-m0", "x-m1"]),
                    step(2, gid(0), samples=["y-m0", "y-m1"])])
    assert report.twice_groups == [gid(0)] and report.twice_samples == [] and report.twice_entries == []
    assert report.trained_twice == 1 and not report.ok
    assert "trained twice (1: groups=1 samples=0 entries=0)" in result_line(report)


def test_trained_twice_by_sample_id():
    report = audit([admitted(0), admitted(1), step(1, gid(0), samples=["s-a", "s-b"]),
                    step(2, gid(1), samples=["s-b", "s-c"])])
    assert report.twice_groups == [] and report.twice_samples == ["s-b"] and report.twice_entries == []
    assert report.trained_twice == 1 and not report.ok
    assert report.samples_trained == 3


def test_trained_twice_by_entry_id():
    report = audit([admitted(0), admitted(1), step(1, gid(0), entries=["1-0", "1-1"]),
                    step(2, gid(1), entries=["1-1", "2-0"])])
    assert report.twice_entries == ["1-1"] and report.trained_twice == 1 and not report.ok


def test_trained_twice_counts_distinct_offenders():
    events = [admitted(0), step(1, gid(0)), step(2, gid(0)), step(3, gid(0))]
    report = audit(events)
    # one group, two sample ids (same in all three steps); entry ids differ per step
    assert report.trained_twice == 1 + G


def test_repeat_inside_one_step_is_reported_not_failed():
    report = audit([admitted(0), step(1, gid(0), samples=["a", "a"], entries=["1-0", "1-1"])])
    assert report.repeated_within_step == 1 and report.trained_twice == 0 and report.ok


def test_duplicate_step_number():
    report = audit([admitted(0), admitted(1), step(1, gid(0)), step(1, gid(1))])
    assert report.duplicate_steps == [1] and report.missing_steps == [] and not report.ok
    assert "steps are not exactly 1..N (duplicates 1, missing none)" in result_line(report)


def test_gap_in_steps():
    report = audit([admitted(0), admitted(1), step(1, gid(0)), step(3, gid(1))])
    assert report.missing_steps == [2] and report.duplicate_steps == [] and not report.ok
    assert (report.steps, report.first_step, report.last_step) == (2, 1, 3)


def test_steps_must_start_at_one():
    report = audit([admitted(0), step(2, gid(0))])
    assert report.missing_steps == [1] and not report.ok


def test_steps_out_of_order_but_complete_pass():
    report = audit([admitted(0), admitted(1), step(2, gid(1)), step(1, gid(0))])
    assert report.ok and (report.first_step, report.last_step) == (2, 1)


def test_rejected_group():
    long_reason = "rollout job failed: " + "x" * 200
    events = [admitted(0), admitted(1), admitted(2), rejected(gid(1), long_reason), rejected(gid(2), long_reason),
              step(1, gid(0))]
    report = audit(events)
    assert report.ok and report.rejected == 2 and report.lost == [] and report.in_flight == []
    assert report.rejected_reasons == {long_reason[:80]: 2}
    assert f"rejected_reason: 2  {long_reason[:80]}" in report.lines()


def test_rejected_after_training_counts_as_trained():
    events = [admitted(0), admitted(1), step(1, gid(0), gid(1)), rejected(gid(1), "spent job")]
    report = audit(events)
    assert report.ok
    assert report.trained == 2 and report.rejected == 0 and report.rejected_reasons == {}
    assert report.rejected_after_training == [gid(1)]
    assert any(line.startswith("rejected_after_training: 1") for line in report.lines())


def test_rejected_then_readmitted_attempt():
    events = [admitted(0), rejected(gid(0)), admitted(0, attempt=1), step(1, gid(0, 1))]
    report = audit(events)
    assert report.ok and report.admitted == 2 and report.trained == 1 and report.rejected == 1


def test_trained_not_admitted_is_reported_only():
    report = audit([step(1, gid(7))])
    assert report.trained_not_admitted == [gid(7)] and report.ok


def test_several_failures_all_named():
    events = [admitted(0), admitted(1), step(1, gid(0)), step(1, gid(0))]
    report = audit(events)
    line = result_line(report)
    assert "lost groups (1)" in line and "trained twice" in line and "steps are not exactly" in line


def test_long_id_lists_are_capped():
    events = [admitted(i) for i in range(30)]
    report = audit(events)
    lost_line = next(line for line in report.lines() if line.startswith("groups_lost:"))
    assert lost_line.startswith("groups_lost: 30") and "(+10 more)" in lost_line
