"""The trainer's buffer of rollouts, from the stream to groups ready to train.

``RolloutBuffer`` owns the reading and grouping: reads through the consumer group
``trainer`` (its pending-entries list holds every sample delivered and not yet committed:
the durable buffer), group assembly, scoring of complete groups, settling of groups that
will never complete (also sampled ones none of whose entries decodes), dropping groups past
the staleness bound, and the re-reads of the pending list after a lost reply. Below it,
the stream reads it is made of: decoding and checking each entry, dead-lettering the bad
ones, paging the pending list, and fetching the entries a committed step names.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterator

import redis

from rlstream.core import keys
from rlstream.core.bus import FIELD, Entry, as_text, xadd, xrange_all
from rlstream.core.codec import DecodeError, decode
from rlstream.core.config import Config
from rlstream.core.connection import count_connection_errors
from rlstream.core.messages import DeadLetter, RolloutSample
from rlstream.core.run_state import RunState
from rlstream.trainer.batch import Group, GroupAssembler, overdue_unseen, take_oldest
from rlstream.trainer.commit import ack_untrained, reject_group
from rlstream.trainer.lease import TrainerLease
from rlstream.trainer.staleness import sampling_follows_weights, split_stale, staleness_bound

log = logging.getLogger(__name__)
CONSUMER = "trainer-0"  # one fixed name: a restarted trainer finds its own pending entries
RESCAN_EVERY_S = 10.0  # idle re-reads of the pending list (see RolloutBuffer.rescan_pending)
READ_COUNT = 512  # entries per read


class RolloutBuffer:
    """Scored groups in ``ready``, oldest admitted first out (``take``). ``score(group)``
    (the trainer's advantages and dynamic_filter_fn) returns the reason to reject a
    complete group, or None to keep it; ``follow_events()`` folds new events into
    ``state``, the run state the trainer and this buffer share. Every entry of an open or
    ready group stays pending until the step that trains it commits."""

    def __init__(self, r: redis.Redis, cfg: Config, state: RunState, *, vocab_size: int,
                 score: Callable[[Group], str | None], follow_events: Callable[[], object], lease: TrainerLease):
        self.r, self.cfg, self.state, self.lease = r, cfg, state, lease  # every write here is fenced by the lease
        self.score, self.follow_events = score, follow_events
        self.limits = {"vocab_size": vocab_size, "max_seq_len": cfg.max_seq_len}
        self.assembler, self.ready = GroupAssembler(), []
        self.connection_errors, self.errors_seen = count_connection_errors(r), 0
        self.last_rescan = time.monotonic()
        self.bound, self.follows_weights = staleness_bound(cfg), sampling_follows_weights(cfg)
        self.stale_dropped = self.stale_in_batch = 0  # dropped as stale since the last take / before it
        self.unseen: dict[str, float] = {}  # sampled groups no member of which is here -> first noticed
        self.caught_up_at = float("-inf")  # start of the newest read that left nothing unread

    def fill(self, n: int, version: int) -> None:
        """Read until ``n`` groups that the weights of ``version`` may train (the staleness
        bound) are ready, the data is exhausted or the run has finished."""
        self.drop_stale(version)
        while len(self.ready) < n and not self.data_exhausted() and self.state.finished is None:
            self.collect()
            self.drop_stale(version)

    def take(self, n: int, version: int) -> list[Group]:
        """The ``n`` ready groups admitted at the oldest version, none past the staleness bound."""
        self.drop_stale(version)
        groups, self.ready = take_oldest(self.ready, n)
        self.stale_in_batch, self.stale_dropped = self.stale_dropped, 0
        return groups

    def drop_stale(self, version: int) -> None:
        """Reject the ready groups the weights of ``version`` are more than O + 1 versions ahead
        of (docs/design.md §5 Versions and the gate): dropped, never trained late."""
        self.ready, stale = split_stale(self.ready, version, self.bound, self.follows_weights)
        for group, reason in stale:
            log.warning("dropping group %s: %s", group.group_id, reason)
            self.reject(group, reason)
        self.stale_dropped += len(stale)

    def data_exhausted(self) -> bool:
        """Every admitted group is settled or waiting in ``ready``, and no row is left."""
        if self.state.exhausted_groups is None:
            return False
        ready_ids = {g.group_id for g in self.ready}
        return all(g.group_id in ready_ids for g in self.state.open_groups)

    def restore(self) -> None:
        """At resume, after the events fold: this consumer's whole pending list, then the
        members dead-lettered before the crash (or just now), which still count towards
        settling their groups."""
        self.assembler.completed |= self.state.settled_groups
        self.add_samples(read_all_pending(self.r, self.cfg.run_id, CONSUMER, count=READ_COUNT, **self.limits))
        self.add_invalid(list(dead_members(self.r, self.cfg.run_id)))
        # the whole pending list was just read: the next rescan is due only later
        self.errors_seen, self.last_rescan = self.connection_errors(), time.monotonic()

    def collect(self) -> None:
        """One blocking read of new entries, then the events that arrived meanwhile."""
        invalid: list[Entry] = []
        delivered: list[int] = []
        read_start = time.monotonic()
        entries = read_group(self.r, self.cfg.run_id, CONSUMER, count=READ_COUNT, block_ms=200, invalid=invalid,
                             delivered=delivered, **self.limits)
        if delivered[0] < READ_COUNT:
            self.caught_up_at = read_start
        self.add_samples(entries)
        self.rescan_pending(idle=not entries, invalid=invalid)
        self.follow_events()
        self.add_invalid([s for _, s in invalid])
        self.reject_unseen()
        timeout = self.cfg.job_timeout
        for group in self.assembler.pop_stale(2.0 * timeout):
            if len(group.members) >= self.cfg.min_group_size:
                self.admit(group)
            elif group.accounted_for:
                self.reject(group, f"incomplete: {len(group.members)} of {group.size} samples valid, "
                                   f"{len(group.invalid)} dead-lettered (see `rlstream dead {self.cfg.run_id}`)")
            else:
                self.reject(group, f"incomplete: {len(group.members)} of {group.size} samples valid after "
                                   f"{2 * timeout}s")

    def reject_unseen(self) -> None:
        """A group a worker reports sampled (``GroupSampled``, same MULTI as its samples) none
        of whose members reached this buffer, not even as a dead letter naming it (its entries
        did not decode): nothing would ever settle it, and with O = 0 the gate would wait for it
        forever. Rejected once noticed for ``2 × job_timeout`` and a read since then caught up."""
        held = self.assembler.open.keys() | self.assembler.completed
        noticed = [g.group_id for g in self.state.open_groups if g.group_id in self.state.sampled
                   and g.group_id not in held]
        self.unseen, overdue = overdue_unseen(self.unseen, noticed, time.monotonic(), 2.0 * self.cfg.job_timeout,
                                              self.caught_up_at)
        for gid in overdue:
            self.reject(Group(gid, 0), f"group {gid} sampled (GroupSampled) but none of its samples reached the "
                                       f"trainer decodable in {2 * self.cfg.job_timeout}s (`rlstream dead "
                                       f"{self.cfg.run_id}`)")

    def rescan_pending(self, *, idle: bool, invalid: list[Entry]) -> None:
        """Redis makes entries pending before it replies to XREADGROUP: when the reply is lost
        (connection drop), the client's retried ``>`` read skips them. Re-read the pending
        list after every connection error the client retried through, and every
        RESCAN_EVERY_S while idle, taking only entries this trainer does not hold (acking a
        held one would lose it in a crash before its commit)."""
        errors = self.connection_errors()
        if errors == self.errors_seen and not (idle and time.monotonic() - self.last_rescan > RESCAN_EVERY_S):
            return
        self.errors_seen, self.last_rescan = errors, time.monotonic()
        held = self.assembler.held_entry_ids() | {e for g in self.ready for e in g.entry_ids}
        found = read_unheld_pending(self.r, self.cfg.run_id, CONSUMER, held, invalid=invalid, **self.limits)
        if found:
            log.warning("picked up %d pending entries no read had returned (a lost reply?)", len(found))
            self.add_samples(found)

    def add_samples(self, entries: list[tuple[str, RolloutSample]]) -> None:
        settled, duplicates = self.state.settled_groups, []
        for entry_id, sample in entries:
            group, dup = self.assembler.add(entry_id, sample, settled)
            if group is not None:
                self.admit(group)
            if dup is not None:
                duplicates.append(dup)
        ack_untrained(self.r, self.cfg.run_id, duplicates, self.lease)

    def add_invalid(self, samples: list[RolloutSample | DeadLetter]) -> None:
        """Dead-lettered members of admitted groups (their GroupAdmitted precedes them, so
        call this after a fold): they settle their group instead of leaving it open."""
        for sample in samples:
            if sample.group_id in self.state.admitted:
                self.assembler.add_invalid(sample, self.state.settled_groups)

    def admit(self, group: Group) -> None:
        """Score a group that will grow no more; one ``score`` refuses is rejected with its reason."""
        reason = self.score(group)
        if reason is None:
            self.ready.append(group)
        else:
            self.reject(group, reason)

    def reject(self, group: Group, reason: str) -> None:
        self.state.apply(reject_group(self.r, self.cfg.run_id, group.group_id, group.entry_ids, reason, self.lease))


# ----------------------------------------------------------------- the stream reads


def dead_letter(pipe: Any, run_id: str, source_stream: str, entry_id: str, reason: str, raw: bytes,
                sample: RolloutSample | None = None) -> None:
    log.warning("dead-lettered %s %s: %s", source_stream, entry_id, reason)
    member = dict(sample_id=sample.sample_id, group_id=sample.group_id, group_size=sample.group_size) \
        if _stamped(sample) else {}
    xadd(pipe, keys.dead(run_id), DeadLetter(
        source_stream=source_stream, source_id=entry_id, reason=reason, raw=raw[:65536], **member))


def decode_entries(
    r: redis.Redis, run_id: str, stream: str, raw_entries: list, *, group: str | None,
    vocab_size: int | None = None, max_seq_len: int | None = None, invalid: list[Entry] | None = None,
) -> list[Entry]:
    """Decode stream entries; invalid ones go to the dead-letter stream (and are XACKed
    in the same MULTI when read through ``group``) so that consumers keep running.

    ``invalid`` collects the dead-lettered entries that are well-formed, worker-stamped
    samples failing only the vocabulary / ``max_seq_len`` checks: their group will never
    complete, and the trainer must settle it rather than wait for it forever."""
    good: list[Entry] = []
    bad: list[tuple[str, str, bytes, RolloutSample | None]] = []
    for entry_id, fields in raw_entries:
        sid = as_text(entry_id)
        raw = (fields or {}).get(FIELD, b"")
        msg = None
        try:
            msg = decode(raw, expect=RolloutSample)
            msg.check_limits(vocab_size, max_seq_len)
            if not _stamped(msg):
                raise ValueError("sample has no sample_id/group_id/group_size (not stamped by a worker)")
        except (DecodeError, ValueError) as exc:
            bad.append((sid, str(exc), raw if isinstance(raw, bytes) else b"", msg))
            if invalid is not None and _stamped(msg):
                invalid.append((sid, msg))
            continue
        good.append((sid, msg))
    if bad:
        with r.pipeline(transaction=True) as pipe:
            for sid, reason, raw, msg in bad:
                dead_letter(pipe, run_id, stream, sid, reason, raw, msg)
            if group is not None:
                pipe.xack(stream, group, *[sid for sid, *_ in bad])
            pipe.execute()
    return good


def _stamped(msg: RolloutSample | None) -> bool:
    return msg is not None and bool(msg.sample_id and msg.group_id) and msg.group_size >= 1


def read_group(
    r: redis.Redis, run_id: str, consumer: str, *, count: int, block_ms: int | None,
    vocab_size: int | None = None, max_seq_len: int | None = None, invalid: list[Entry] | None = None,
    delivered: list[int] | None = None,
) -> list[Entry]:
    """XREADGROUP of new entries (``>``) on the rollouts stream; ``read_pending`` and
    ``read_all_pending`` read this consumer's durable buffer. ``invalid``: see ``decode_entries``.
    ``delivered`` gets the number of entries read, decodable or not (fewer than ``count``: the
    read caught up with the stream)."""
    stream = keys.rollouts(run_id)
    reply = r.xreadgroup(keys.TRAINER_GROUP, consumer, {stream: ">"}, count=count, block=block_ms)
    raw_entries = reply[0][1] if reply else []
    if delivered is not None:
        delivered.append(len(raw_entries))
    return decode_entries(r, run_id, stream, raw_entries, group=keys.TRAINER_GROUP,
                          vocab_size=vocab_size, max_seq_len=max_seq_len, invalid=invalid)


def read_pending(
    r: redis.Redis, run_id: str, consumer: str, after: str, *, count: int,
    vocab_size: int | None = None, max_seq_len: int | None = None, invalid: list[Entry] | None = None,
) -> tuple[list[Entry], str | None]:
    """One page of this consumer's pending entries with ids > ``after``: (valid entries,
    the last id read or None when the list is exhausted). Page with the returned id.

    A pending entry whose payload was deleted (XDEL, trimming) comes back empty: it can
    never be trained, so it is acked (with a warning) instead of staying pending forever."""
    stream = keys.rollouts(run_id)
    reply = r.xreadgroup(keys.TRAINER_GROUP, consumer, {stream: after}, count=count)
    page = reply[0][1] if reply else []
    if not page:
        return [], None
    _ack_gone(r, stream, [as_text(e[0]) for e in page if not e[1]])
    good = decode_entries(r, run_id, stream, [e for e in page if e[1]], group=keys.TRAINER_GROUP,
                          vocab_size=vocab_size, max_seq_len=max_seq_len, invalid=invalid)
    return good, as_text(page[-1][0])  # the raw page's last id: a page of deleted entries is not the end


def read_all_pending(r: redis.Redis, run_id: str, consumer: str, *, count: int = 512,
                     vocab_size: int | None = None, max_seq_len: int | None = None,
                     invalid: list[Entry] | None = None) -> list[Entry]:
    """This consumer's whole pending-entries list (every page), decoded."""
    out: list[Entry] = []
    after: str | None = "0"
    while after is not None:
        entries, after = read_pending(r, run_id, consumer, after, count=count, vocab_size=vocab_size,
                                      max_seq_len=max_seq_len, invalid=invalid)
        out.extend(entries)
    return out


def read_unheld_pending(r: redis.Redis, run_id: str, consumer: str, held: set[str], *, page: int = 1000,
                        vocab_size: int | None = None, max_seq_len: int | None = None,
                        invalid: list[Entry] | None = None) -> list[Entry]:
    """This consumer's pending entries that are not in ``held``, decoded. Only ids travel
    for the held ones (XPENDING), so a periodic check costs little however large the
    buffer; payloads that are gone are acked with a warning, as in ``read_pending``."""
    stream, wanted, start = keys.rollouts(run_id), [], "-"
    while True:
        rows = r.xpending_range(stream, keys.TRAINER_GROUP, min=start, max="+", count=page, consumername=consumer)
        wanted += [sid for sid in (as_text(row["message_id"]) for row in rows) if sid not in held]
        if len(rows) < page:
            break
        start = "(" + as_text(rows[-1]["message_id"])
    if not wanted:
        return []
    raw = fetch_entries(r, stream, wanted)
    _ack_gone(r, stream, [sid for sid in wanted if sid not in raw])
    return decode_entries(r, run_id, stream, [(sid, {FIELD: raw[sid]}) for sid in wanted if sid in raw],
                          group=keys.TRAINER_GROUP, vocab_size=vocab_size, max_seq_len=max_seq_len, invalid=invalid)


def _ack_gone(r: redis.Redis, stream: str, gone: list[str]) -> None:
    """Pending entries whose payload was deleted (XDEL, trimming) can never be trained: ack
    them, with a warning, rather than leave them pending forever."""
    if gone:
        log.warning("acking %d pending entries of %s whose payload is gone (deleted or trimmed), e.g. %s",
                    len(gone), stream, gone[:5])
        r.xack(stream, keys.TRAINER_GROUP, *gone)


def dead_members(r: redis.Redis, run_id: str, page: int = 1000) -> Iterator[DeadLetter]:
    """Dead letters of worker-stamped samples (they failed the vocabulary / ``max_seq_len``
    checks; each names its sample and group): a restarted trainer settles their groups."""
    source = keys.rollouts(run_id)
    for _, raw in xrange_all(r, keys.dead(run_id), page=page):
        try:
            letter = decode(raw, expect=DeadLetter)
        except DecodeError:
            continue
        if letter.source_stream == source and letter.group_id:
            yield letter


def fetch_entries(r: redis.Redis, stream: str, entry_ids: list[str]) -> dict[str, bytes]:
    """Raw message bytes of specific entries (for replaying a committed step)."""
    with r.pipeline(transaction=False) as pipe:
        for entry_id in entry_ids:
            pipe.xrange(stream, entry_id, entry_id, count=1)
        replies = pipe.execute()
    return {as_text(rep[0][0]): rep[0][1].get(FIELD, b"") for rep in replies if rep}
