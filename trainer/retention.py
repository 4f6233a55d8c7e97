"""What a long run keeps, and where (docs/design.md §15.45 Archive, then trim; §15.46 Checkpoints
every 50 steps, pruned): after each checkpoint the trainer moves the rollouts the checkpoint covers out of
Redis into the run's archive, trims the stream below them, and prunes old checkpoints; under
memory pressure it checkpoints early so that the trim frees Redis (§15.48 A memory guard before Redis refuses writes).

The archive pass copies every rollouts entry below the *safe bound* (the oldest entry still
pending in the consumer group, or the first one not yet delivered, whichever is lower):
each such entry is acked, so it was trained by a committed step (covered by the checkpoint
just written, since the checkpoint follows its step's commit), acked as a duplicate, or
rejected or dead-lettered with its group. Pending and undelivered entries are never copied
nor trimmed. The order (segment fsynced, manifest fsynced, then XTRIM MINID) is what makes
every crash point safe: see the failure table (docs/design.md §10 Failure semantics).
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

import redis

from rlstream.core import keys
from rlstream.core.archive import Archive, Segment, id_key
from rlstream.core.bus import as_text, xrange_all
from rlstream.core.memory_guard import memory_pressure
from rlstream.trainer import failpoints
from rlstream.trainer.checkpoint import complete_checkpoints

log = logging.getLogger(__name__)
PIN_SUFFIX = ".keep"  # checkpoints/step-<N>.keep next to a checkpoint: the user still needs it
SEGMENT_BYTES = 64 << 20  # entry bytes per archive segment
# Seconds between two reads of Redis's memory use (an INFO round trip, ~0.3 ms, was one per step):
# the producer stops admitting past the same mark on its own, so a trainer that notices up to a
# second late only starts its early checkpoint later, while the headroom above the mark remains.
MEMORY_CHECK_S = 1.0


def next_id(entry_id: str) -> str:
    ms, seq = id_key(entry_id)
    return f"{ms}-{seq + 1}"


def safe_bound(r: redis.Redis, stream: str) -> str:
    """The lowest rollouts id the archive pass must not reach: the oldest pending entry, or
    the first entry after the last one delivered to the consumer group, whichever is lower."""
    delivered = "0-0"
    for g in r.xinfo_groups(stream):
        if as_text(g.get("name", b"")) == keys.TRAINER_GROUP:
            delivered = as_text(g.get("last-delivered-id", "0-0"))
    bound = next_id(delivered)
    pending = r.xpending(stream, keys.TRAINER_GROUP)
    if pending.get("pending") and pending.get("min") is not None:
        oldest = as_text(pending["min"])
        bound = oldest if id_key(oldest) < id_key(bound) else bound
    return bound


def _chunks(entries: Iterator[tuple[str, bytes]], max_bytes: int) -> Iterator[list[tuple[str, bytes]]]:
    chunk, size = [], 0
    for entry in entries:
        chunk.append(entry)
        size += len(entry[1])
        if size >= max_bytes:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def archive_and_trim(r: redis.Redis, archive: Archive, covered_step: int,
                     tap: Callable[[Iterator], Iterator] | None = None) -> tuple[list[Segment], int]:
    """Copy the entries below the safe bound that the archive does not hold yet into new
    segments (at most ``SEGMENT_BYTES`` of entries each, so a reader holds one in memory),
    then trim the stream below the bound: (the segments written, entries trimmed). Run only
    after the checkpoint of ``covered_step`` is sealed."""
    stream = keys.rollouts(archive.run_id)
    bound, upto = safe_bound(r, stream), archive.upto()
    segments: list[Segment] = []
    if upto is None or id_key(upto) < id_key(bound):
        entries = xrange_all(r, stream, start="-" if upto is None else "(" + upto, end="(" + bound)
        for chunk in _chunks(entries, SEGMENT_BYTES):
            segment = archive.append(tap(iter(chunk)) if tap is not None else chunk, after=archive.upto(),
                                     before=bound, covered_step=covered_step)
            segments += [segment] if segment is not None else []
    # Everything below the bound is now archived (at or below ``upto`` earlier, or just now),
    # so the trim loses nothing; repeated after a crash between manifest and trim, it is a no-op.
    trimmed = r.xtrim(stream, minid=bound, approximate=False)
    if trimmed:
        log.info("trimmed %d archived rollouts from %s (below %s)", trimmed, stream, bound)
    return segments, trimmed


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep`` (0 = keep all), except the ones
    a user pinned with a ``step-<N>.keep`` file beside them. Incomplete directories (a save
    cut short) are left for the next save of that step to replace."""
    if keep <= 0:
        return []
    removed = []
    for path in list(complete_checkpoints(run_dir))[keep:]:
        if path.with_name(path.name + PIN_SUFFIX).exists():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("pruned %d checkpoint(s) beyond the newest %d: %s", len(removed), keep, [p.name for p in removed])
    return removed


class Retention:
    """The trainer's side of a long run: archive + trim after each checkpoint, checkpoint
    pruning, an early checkpoint under memory pressure, and the archive's rewind at resume.
    ``enabled`` only on the trainer's own run (``Trainer.train_run``), never on the source
    of a replay, whose stream is only read."""

    def __init__(self, r: redis.Redis, cfg, run_dir: Path, lease):
        self.r, self.cfg, self.run_dir, self.lease = r, cfg, run_dir, lease
        self.archive = Archive(run_dir, cfg.run_id)
        self.enabled = False
        self.last_checkpoint = 0
        self.next_memory_check = float("-inf")  # monotonic time the next INFO is due (``pressed``)

    def start(self, steps: int) -> None:
        """At resume, after the events fold: archive segments Redis no longer follows are set aside."""
        self.enabled = self.cfg.retention.archive
        if self.enabled:
            self.archive.rewind(steps)

    def after_checkpoint(self, step: int, saved: bool) -> None:
        self.last_checkpoint = step
        if saved:
            prune_checkpoints(self.run_dir, self.cfg.retention.keep_checkpoints)
        if self.enabled:
            self.lease.confirm()  # the archive is this run's: no trainer without the lease writes or trims it
            tap = failpoints.die_mid_write if failpoints.armed("mid_archive", step) else None
            archive_and_trim(self.r, self.archive, step, tap=tap)
            if failpoints.armed("after_trim", step):
                failpoints.kill_embedded_redis(self.run_dir)

    def pressed(self, step: int) -> bool:
        """Redis is past ``retention.memory_high_water`` of its maxmemory: checkpoint now, so
        that the trim frees what the steps since the last checkpoint hold. At most every
        tenth of ``dcp_save_interval`` steps: when what fills Redis cannot be trimmed (pending
        samples), a checkpoint per step would only slow training down. Redis is asked at most every
        ``MEMORY_CHECK_S``."""
        if not self.enabled or step - self.last_checkpoint < max(1, self.cfg.dcp_save_interval // 10):
            return False
        now = time.monotonic()
        if now < self.next_memory_check:
            return False
        self.next_memory_check = now + MEMORY_CHECK_S
        fraction = memory_pressure(self.r, self.cfg.retention.memory_high_water)
        if fraction is not None:
            log.warning("Redis is at %.0f%% of its maxmemory: checkpointing early to archive and trim the rollouts "
                        "(raise redis.maxmemory_mb or lower dcp_save_interval if this repeats)", 100 * fraction)
        return fraction is not None
