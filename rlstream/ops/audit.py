"""``rlstream audit [RUN]``: check a run's sample ledger against the promises of
docs/design.md §10 Failure semantics: every admitted group is trained exactly once or explicitly rejected,
no sample is trained twice, step numbering is continuous.

The audit folds the whole events stream and reads every rollout the run ever had: the
run's archive (the rollouts moved out of Redis after a checkpoint, docs/design.md §15.45
Archive, then trim), then the rollouts stream (XRANGE in pages of 1000). Entries that do not
decode are counted, never fatal; an archive segment that is missing or damaged fails the
audit, named (the ledger cannot be exact without it). Like ``status``, it
starts a finished run's embedded redis-server from the run directory's AOF for the time
of the query.

Definitions (``audit_ledger`` computes them from plain messages, without Redis):

- **admitted**: group ids named by a ``GroupAdmitted`` event.
- **trained**: group ids named in ``StepCommitted.group_ids``.
- **trained twice**: a group id named in more than one ``StepCommitted``, or a
  ``sample_id`` or rollouts-stream ``entry_id`` appearing in more than one
  ``StepCommitted``. The figure counts distinct offenders (a group id, a sample id and an
  entry id each count once however many steps repeat them); the breakdown by kind is
  printed too. An id listed twice inside one step is reported separately
  (``repeated_within_step``, the number of surplus listings) and does not fail the audit.
- **rejected**: ``GroupRejected`` group ids that were not trained. A group both rejected
  and trained counts as trained and is reported as ``rejected_after_training``: not an
  error. The trainer never trains a group whose rejection stands in its fold when it takes
  a batch (docs/design.md §15.98 A written group is the trainer's to settle), so only a
  rejection naming no writer (a worker older than that rule) folded after it took the
  group, or a run trained by an older trainer, can still show one. Reasons are tallied per reason, truncated to 80
  characters. A rejection the run's fold voids is not one: after the group's
  ``GroupSampled`` only the trainer's counts (``rejection_stands``).
- **in flight**: admitted, not trained, not rejected, and with a trace: at least one of
  its samples is in the rollouts stream, or its rq job hash exists
  (``rq:job:{run_id}-{group_id}``).
- **lost**: admitted, not trained, not rejected, and no trace at all.
- **trained not admitted**: trained group ids without a ``GroupAdmitted`` (reported only).
- **steps**: the ``StepCommitted.step`` numbers must be exactly ``1..N``, each once
  (N = the largest step; N = 0 when no step was committed). ``duplicate_steps`` lists
  numbers committed more than once, ``missing_steps`` the gaps in ``1..N``.
- **samples trained**: distinct sample ids named by all ``StepCommitted`` events.

Exit code: 0 only when lost == 0, trained twice == 0, the steps are exactly 1..N and the
archive is whole;
else 1, with a last line ``result: FAILED: ...`` naming each failed check.
Output is ``key: value`` lines (grep- and awk-friendly); id lists are capped.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import redis

from rlstream.core import keys
from rlstream.core.archive import Archive, ArchiveError, all_rollouts
from rlstream.core.bus import xrange_all
from rlstream.core.codec import DecodeError, decode
from rlstream.core.messages import GroupAdmitted, GroupRejected, GroupSampled, Message, RolloutRecord, StepCommitted
from rlstream.core.run_state import rejection_stands

REASON_WIDTH = 80
MAX_IDS_SHOWN = 20


@dataclass
class AuditReport:
    admitted: int = 0
    trained: int = 0
    rejected: int = 0
    rejected_reasons: dict[str, int] = field(default_factory=dict)  # truncated reason -> groups
    rejected_after_training: list[str] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)
    in_flight_by_job: int = 0  # of in_flight: rq job hash present
    in_flight_by_sample: int = 0  # of in_flight: no job, but samples in the rollouts stream
    lost: list[str] = field(default_factory=list)
    trained_not_admitted: list[str] = field(default_factory=list)
    twice_groups: list[str] = field(default_factory=list)
    twice_samples: list[str] = field(default_factory=list)
    twice_entries: list[str] = field(default_factory=list)
    repeated_within_step: int = 0
    steps: int = 0  # StepCommitted events
    first_step: int | None = None  # in stream order
    last_step: int | None = None
    duplicate_steps: list[int] = field(default_factory=list)
    missing_steps: list[int] = field(default_factory=list)
    samples_trained: int = 0
    # Filled in by the Redis side (not by audit_ledger).
    events_read: int = 0
    events_undecodable: int = 0
    rollouts_read: int = 0
    rollouts_undecodable: int = 0
    dead_letters: int = 0
    rollouts_archived: int = 0  # of rollouts_read: read from the archive
    archive_problems: list[str] = field(default_factory=list)

    @property
    def trained_twice(self) -> int:
        return len(self.twice_groups) + len(self.twice_samples) + len(self.twice_entries)

    @property
    def steps_ok(self) -> bool:
        return not self.duplicate_steps and not self.missing_steps

    @property
    def failures(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"lost groups ({len(self.lost)})")
        if self.trained_twice:
            out.append(f"trained twice ({self.trained_twice}: groups={len(self.twice_groups)} "
                       f"samples={len(self.twice_samples)} entries={len(self.twice_entries)})")
        if self.archive_problems:
            out.append(f"archive damaged ({len(self.archive_problems)}): " + "; ".join(self.archive_problems))
        if not self.steps_ok:
            out.append(f"steps are not exactly 1..N (duplicates {_ids(self.duplicate_steps)}, "
                       f"missing {_ids(self.missing_steps)})")
        return out

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        """The report as ``key: value`` lines, the last one being ``result: ...``."""
        out = [
            f"groups_admitted: {self.admitted}",
            f"groups_trained: {self.trained}",
            f"groups_rejected: {self.rejected}",
        ]
        out += [f"rejected_reason: {n}  {reason}" for reason, n in
                sorted(self.rejected_reasons.items(), key=lambda kv: (-kv[1], kv[0]))]
        out += [
            f"rejected_after_training: {len(self.rejected_after_training)}"
            f"{_bracketed_ids(self.rejected_after_training)}",
            f"groups_in_flight: {len(self.in_flight)}  (job={self.in_flight_by_job} "
            f"samples_only={self.in_flight_by_sample}){_bracketed_ids(self.in_flight)}",
            f"groups_lost: {len(self.lost)}{_bracketed_ids(self.lost)}",
            f"trained_not_admitted: {len(self.trained_not_admitted)}{_bracketed_ids(self.trained_not_admitted)}",
            f"trained_twice: {self.trained_twice}",
            f"trained_twice_groups: {len(self.twice_groups)}{_bracketed_ids(self.twice_groups)}",
            f"trained_twice_samples: {len(self.twice_samples)}{_bracketed_ids(self.twice_samples)}",
            f"trained_twice_entries: {len(self.twice_entries)}{_bracketed_ids(self.twice_entries)}",
            f"repeated_within_step: {self.repeated_within_step}",
            f"steps: {self.steps}",
            f"first_step: {_or_dash(self.first_step)}",
            f"last_step: {_or_dash(self.last_step)}",
            f"duplicate_steps: {_ids(self.duplicate_steps)}",
            f"missing_steps: {_ids(self.missing_steps)}",
            f"samples_trained: {self.samples_trained}",
            f"events_read: {self.events_read}",
            f"events_undecodable: {self.events_undecodable}",
            f"rollouts_read: {self.rollouts_read}",
            f"rollouts_undecodable: {self.rollouts_undecodable}",
            f"rollouts_archived: {self.rollouts_archived}",
            f"dead_letters: {self.dead_letters}",
        ]
        out.append("result: ok" if self.ok else "result: FAILED: " + "; ".join(self.failures))
        return out


def _or_dash(value: int | None) -> str:
    return "-" if value is None else str(value)


def _ids(items: list) -> str:
    """A capped, space-separated id list, or ``none``."""
    if not items:
        return "none"
    shown = " ".join(str(i) for i in items[:MAX_IDS_SHOWN])
    more = len(items) - MAX_IDS_SHOWN
    return shown + (f" (+{more} more)" if more > 0 else "")


def _bracketed_ids(items: list) -> str:
    return f"  [{_ids(items)}]" if items else ""


def _one_line(text: str, width: int = REASON_WIDTH) -> str:
    return " ".join(text.split())[:width]


def audit_ledger(events: list[Message], samples: Iterable[RolloutRecord],
                 job_exists: Callable[[GroupAdmitted], bool]) -> AuditReport:
    """The ledger check on plain messages (see the module docstring for the definitions).

    ``events`` in stream order; ``samples`` = the decodable rollouts-stream entries;
    ``job_exists(admitted)`` says whether the rq job hash of the job carrying that admitted
    group exists (it is asked only about open groups without a sample in the stream)."""
    report = AuditReport()
    admitted: dict[str, GroupAdmitted] = {}
    rejected: dict[str, str] = {}  # group id -> the reason of its rejection that stands
    sampled: set[str] = set()  # group ids a worker wrote (GroupSampled)
    group_steps: dict[str, int] = Counter()  # group id -> StepCommitted events naming it
    sample_steps: dict[str, int] = Counter()
    entry_steps: dict[str, int] = Counter()
    step_numbers: list[int] = []
    for msg in events:
        if isinstance(msg, GroupAdmitted):
            admitted.setdefault(msg.group_id, msg)
        elif isinstance(msg, GroupRejected):
            if rejection_stands(msg, rejected, sampled):
                rejected[msg.group_id] = msg.reason
        elif isinstance(msg, GroupSampled):
            sampled.add(msg.group_id)
        elif isinstance(msg, StepCommitted):
            step_numbers.append(msg.step)
            for counter, ids in ((group_steps, msg.group_ids), (sample_steps, msg.sample_ids),
                                 (entry_steps, msg.entry_ids)):
                distinct = set(ids)
                report.repeated_within_step += len(ids) - len(distinct)
                counter.update(distinct)

    trained = set(group_steps)
    report.admitted = len(admitted)
    report.trained = len(trained)
    report.twice_groups = sorted(g for g, n in group_steps.items() if n > 1)
    report.twice_samples = sorted(s for s, n in sample_steps.items() if n > 1)
    report.twice_entries = sorted(e for e, n in entry_steps.items() if n > 1)
    report.samples_trained = len(sample_steps)
    report.trained_not_admitted = sorted(trained - set(admitted))

    reasons: Counter[str] = Counter()
    for gid, reason in rejected.items():
        if gid in trained:
            report.rejected_after_training.append(gid)
        else:
            report.rejected += 1
            reasons[_one_line(reason)] += 1
    report.rejected_after_training.sort()
    report.rejected_reasons = dict(reasons)

    with_samples = {s.group_id for s in samples}
    for gid in admitted:
        if gid in trained or gid in rejected:
            continue
        if gid in with_samples:
            report.in_flight.append(gid)
            report.in_flight_by_sample += 1
        elif job_exists(admitted[gid]):
            report.in_flight.append(gid)
            report.in_flight_by_job += 1
        else:
            report.lost.append(gid)

    report.steps = len(step_numbers)
    if step_numbers:
        report.first_step, report.last_step = step_numbers[0], step_numbers[-1]
        counts = Counter(step_numbers)
        report.duplicate_steps = sorted(n for n, c in counts.items() if c > 1)
        report.missing_steps = [n for n in range(1, max(counts) + 1) if n not in counts]
    return report


# --------------------------------------------------------------------------- Redis side


def decode_all(entries: Iterable[tuple[str, bytes]],
               expect: type[Message] | None = None) -> tuple[list[tuple[str, Message]], list[tuple[str, str]]]:
    """(decoded (id, message) pairs, undecodable (id, reason) pairs)."""
    good: list[tuple[str, Message]] = []
    bad: list[tuple[str, str]] = []
    for entry_id, raw in entries:
        try:
            good.append((entry_id, decode(raw, expect=expect)))
        except DecodeError as exc:
            bad.append((entry_id, str(exc)))
    return good, bad


def collect_audit(r: redis.Redis, run_id: str, run_dir: Path | None = None) -> AuditReport:
    """The audit of ``run_id``; ``run_dir`` holds its archive (None: the stream alone)."""
    from rq.job import Job  # rq (and core.jobs, which imports it) only when an audit runs

    from rlstream.core.jobs import job_of

    events, bad_events = decode_all(xrange_all(r, keys.events(run_id)))
    counts = {"read": 0, "bad": 0, "archived": 0}
    problems: list[str] = []

    def samples() -> Iterator[RolloutRecord]:  # one at a time: a long run's rollouts do not fit in memory
        entries: Iterable[tuple[str, bytes]] = xrange_all(r, keys.rollouts(run_id))
        if run_dir is not None:
            archive = Archive(run_dir, run_id)
            try:
                counts["archived"] = sum(s.entries for s in archive.segments())
                entries = all_rollouts(r, archive, problems)
            except ArchiveError as exc:  # the manifest itself: no segment can be read
                problems.append(str(exc))
        for _, raw in entries:
            counts["read"] += 1
            try:
                yield decode(raw, expect=RolloutRecord)
            except DecodeError:
                counts["bad"] += 1

    report = audit_ledger([m for _, m in events], samples(),
                          lambda group: bool(r.exists(Job.key_for(job_of(run_id, group)))))
    report.events_read, report.events_undecodable = len(events) + len(bad_events), len(bad_events)
    report.rollouts_read, report.rollouts_undecodable = counts["read"], counts["bad"]
    report.rollouts_archived, report.archive_problems = counts["archived"], problems
    report.dead_letters = r.xlen(keys.dead(run_id))
    return report


def audit_main(run: str | None, log_path: str) -> int:
    from rlstream.ops.status import opened_run

    with opened_run(run, log_path) as (run_dir, cfg, r):
        report = collect_audit(r, cfg.run_id, run_dir)
    print(f"run: {cfg.run_id}")
    print(f"run_dir: {run_dir}")
    for line in report.lines():
        print(line)
    return 0 if report.ok else 1
