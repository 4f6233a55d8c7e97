"""Resume (docs/design.md §8 Resume and replay): rebuild the exact state of a crashed trainer from the
newest checkpoint the events stream agrees with, a replay of every ``StepCommitted`` after
it on the very samples it names, then this consumer's pending entries.

``Trainer.resume`` tells that story; this module holds its decisions, none of which
touches the trainer: which checkpoint to start from, the groups a committed step trained,
whether a replayed step matches its record, whether the weights must be published again,
and the metrics lines the events record.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import redis

from rlstream.core import fold_snapshot, keys
from rlstream.core.archive import Archive, fetch_rollouts
from rlstream.core.codec import decode
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import Evaluated, RolloutRecord, StepCommitted
from rlstream.core.metrics import MetricsLog
from rlstream.core.run_state import RunState
from rlstream.trainer import reads
from rlstream.trainer.batch import Group
from rlstream.trainer.checkpoint import CheckpointState, complete_checkpoints, read_state
from rlstream.trainer.commit import sync_committed_step
from rlstream.trainer.lease import TrainerLease
from rlstream.trainer.step_metrics import eval_metrics

log = logging.getLogger(__name__)
LOSS_REL_TOL = 1e-3


def snapshot_checkpoint(run_dir: Path, r: redis.Redis, run_id: str) -> fold_snapshot.Snapshot | None:
    """The newest complete checkpoint whose fold snapshot the events stream agrees with
    (docs/design.md §15.47 Processes start from the checkpoint's fold): resume folds only the events
    after it. None: fold the whole stream and choose with ``usable_checkpoint``."""
    complete = {p.name for p in complete_checkpoints(run_dir)}
    for path in fold_snapshot.candidates(run_dir):
        if path.name in complete:
            snap = fold_snapshot.read(path)  # None: unreadable, and it said why
            if snap is None:
                continue
            if fold_snapshot.agrees_with_events(r, run_id, snap):
                return snap
            log.warning("skipping checkpoint %s: the events stream no longer holds its step's commit or its fold's "
                        "cursor (Redis lost its last writes, e.g. an OS crash with appendfsync everysec); trying an "
                        "older one", path)
    return None


def fold_record(state: RunState, cursor: str, commit_id: str, step: int, metrics: MetricsLog) -> str:
    """The ``fold.json`` a checkpoint seals: the run state folded to ``cursor`` and metrics.jsonl's size."""
    size = metrics.path.stat().st_size if metrics.path.exists() else 0
    return fold_snapshot.dump(state, cursor=cursor, commit_id=commit_id, step=step, metrics_bytes=size)


def rebuild_metrics(metrics: MetricsLog, snap: fold_snapshot.Snapshot | None, history: list,
                    full_history: Callable[[], list]) -> None:
    """metrics.jsonl = the lines the events record. From a snapshot: the file as it was at
    the checkpoint, then the lines of the events after it; a file shorter than that (deleted,
    truncated) is rebuilt from every event (``full_history``)."""
    size = metrics.path.stat().st_size if metrics.path.exists() else 0
    if snap is not None and size >= snap.metrics_bytes:
        with metrics.path.open("r+b") as f:
            f.truncate(snap.metrics_bytes)
    else:
        history = full_history() if snap is not None else history
        metrics.path.write_text("")
    for line in recorded_metrics(history):
        metrics.write(line)


def usable_checkpoint(run_dir: Path, commits: dict[int, str]) -> tuple[Path, CheckpointState] | None:
    """The newest complete checkpoint whose step the events stream records, by the very
    ``StepCommitted`` event it saved (``commits``: step -> event id). Checkpoints are
    fsynced but Redis's AOF (``everysec``) can lose its last second in an OS crash, so a
    checkpoint may be ahead of the events, or of a step re-committed since."""
    for path in complete_checkpoints(run_dir):
        try:
            state = read_state(path)
        except (OSError, ValueError, TypeError) as exc:  # sealed, but not a state this build reads
            log.warning("skipping checkpoint %s: unreadable state.json (%s)", path, exc)
            continue
        if state.step == 0 or commits.get(state.step) == state.events_cursor:
            return path, state
        why = (f"the events stream records only {len(commits)} step(s)" if state.step not in commits else
               f"step {state.step} is now event {commits[state.step]}, not the saved {state.events_cursor}")
        log.warning("skipping checkpoint %s: %s (Redis lost its last writes, e.g. an OS crash with appendfsync "
                    "everysec); trying an older one", path, why)
    return None


def loss_matches(replayed: float, recorded: float) -> bool:
    if not (math.isfinite(replayed) and math.isfinite(recorded)):  # a step whose every minibatch was skipped
        return str(replayed) == str(recorded)  # nan == nan, inf == inf
    return math.isclose(replayed, recorded, rel_tol=LOSS_REL_TOL, abs_tol=1e-6)


def committed_groups(r: redis.Redis, run_id: str, committed: StepCommitted, set_advantages,
                     archive: Archive | None = None) -> list[Group]:
    """The groups a committed step trained, rebuilt from the very entries it names, in the
    same order, with advantages set by ``set_advantages(group)``; entries trimmed from the stream are
    read from the run's ``archive`` (docs/design.md §15.45 Archive, then trim)."""
    raw = (fetch_rollouts(r, archive, committed.entry_ids) if archive is not None else
           reads.fetch_entries(r, keys.rollouts(run_id), committed.entry_ids))
    missing = [e for e in committed.entry_ids if e not in raw]
    if missing:
        where = f"the rollouts stream and the archive {archive.dir}" if archive is not None else "the rollouts stream"
        raise RlstreamError(f"cannot replay step {committed.step}: {len(missing)} of its samples (e.g. {missing[0]}) "
                            f"are in neither {where}: were rollouts trimmed without archiving, or archive segments "
                            "deleted? Restore them, or start from a checkpoint after that step")
    groups: dict[str, Group] = {gid: Group(gid, 0) for gid in committed.group_ids}
    for entry_id in committed.entry_ids:
        sample = decode(raw[entry_id], expect=RolloutRecord)
        groups[sample.group_id].members[sample.sample_id] = (entry_id, sample)
    for group in groups.values():
        set_advantages(group)
    return list(groups.values())


def check_replayed(committed: StepCommitted, metrics: dict[str, float], step: int, version: int) -> None:
    """A replayed step must land on the step and version it recorded (else raise); a loss
    other than the recorded one only warns, since training can go on from either weights."""
    if (step, version) != (committed.step, committed.version):
        raise RlstreamError(f"replay diverged: at step {step} v{version}, event says "
                            f"step {committed.step} v{committed.version}")
    recorded = committed.metrics.get("train/loss")
    if recorded is not None and not loss_matches(metrics["train/loss"], recorded):
        log.warning("replay of step %d: loss %.6g, the original step recorded %.6g; the replayed weights may "
                    "differ from the crashed trainer's (changed config or code, or nondeterministic kernels?)",
                    committed.step, metrics["train/loss"], recorded)


def sync_committed_record(r: redis.Redis, run_id: str, step: int, event_id: str, lease: TrainerLease) -> None:
    """Raise the run's committed-step record to the replayed step; warn when it is ahead."""
    previous = sync_committed_step(r, run_id, step, event_id, lease)
    if previous > step:
        log.warning("%s says step %d was committed but the events stream ends at step %d: is another trainer "
                    "running for this run? The next commit will be refused", keys.committed_step(run_id),
                    previous, step)


def must_publish(state: RunState, version: int, weight_sync_interval: int) -> bool:
    """A fresh run (v0 is not published yet), or a crash between a step's commit and its
    ``WeightsPublished``: publish the current weights now. The version left unpublished may be
    an older due one: a step that is not due commits without waiting for the previous version's
    write (``weight_sync``), so the crash can follow a later commit; the gate, which counts
    published versions, would then admit nothing more while the trainer waits for groups."""
    if state.latest_weights is None:
        return True
    if not weight_sync_interval:
        return False
    return state.published_version < version - version % weight_sync_interval  # the newest due version


def recorded_metrics(history: list[tuple[str, StepCommitted | Evaluated]]) -> list[dict[str, float]]:
    """The metrics lines the events record, in order: metrics.jsonl is rebuilt from them."""
    return [event.metrics if isinstance(event, StepCommitted) else
            eval_metrics(event.step, event.version, event.metrics) for _, event in history]
