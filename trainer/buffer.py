"""The trainer's buffer of rollouts, from the stream to groups ready to train.

``RolloutBuffer`` owns the reading and grouping: reads through the consumer group
``trainer`` (its pending-entries list holds every sample delivered and not yet committed:
the durable buffer), group assembly, scoring of complete groups, settling of groups that
will never complete (also sampled ones none of whose entries decodes), dropping groups past
the staleness bound (after a bounded wait for those only the next batch can still train),
dropping ready groups the fold has settled meanwhile, and the re-reads of the pending list
after a lost reply. The stream reads it is made of are ``reads``'.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import redis

from rlstream.core.bus import Entry
from rlstream.core.config import Config
from rlstream.core.connection import count_connection_errors
from rlstream.core.messages import DeadLetter, RolloutRecord
from rlstream.core.run_state import RunState
from rlstream.trainer.batch import Group, GroupAssembler, overdue_unseen, take_oldest
from rlstream.trainer.commit import ack_untrained, reject_group
from rlstream.trainer.lease import TrainerLease
from rlstream.trainer.reads import dead_members, read_all_pending, read_group, read_unheld_pending
from rlstream.trainer.staleness import (
    StragglerWait,
    last_chance,
    sampling_follows_weights,
    split_stale,
    staleness_bound,
)

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
        self.taken: list[Group] = []  # a streamed step's groups, until it is complete (``stream``)
        self.connection_errors, self.errors_seen = count_connection_errors(r), 0
        self.last_rescan = time.monotonic()
        self.bound, self.follows_weights = staleness_bound(cfg), sampling_follows_weights(cfg)
        self.stale_dropped = self.stale_in_batch = 0  # dropped as stale since the last take / before it
        self.straggler_wait = StragglerWait(cfg.trainer.straggler_wait)
        self.unseen: dict[str, float] = {}  # sampled groups no member of which is here -> first noticed
        self.settled_seen = (0, 0)  # how far forget_settled has read the fold's trained and rejected groups
        self.caught_up_at = float("-inf")  # start of the newest read that left nothing unread

    def fill(self, n: int, version: int) -> None:
        """Read until ``n`` groups that the weights of ``version`` may train (the staleness
        bound) are ready and none this batch is the last to be allowed to train is still being
        sampled (``hold_back``), the data is exhausted or the run has finished."""
        self.prune(version)
        while ((len(self.ready) < n or self.hold_back(n, version)) and not self.data_exhausted()
               and self.state.finished is None):
            self.collect()
            self.prune(version)

    def stream(self, n: int, version: int, chunk: Callable[[list[Group]], None]) -> list[Group]:
        """``fill`` and ``take`` for a streamed step (``trainer.streaming``): each group goes to
        ``chunk`` as soon as it is ready (oldest admitted first among the ready ones), so its
        forward/backward runs while the rest of the batch is sampled. Taken groups stay held
        (pending, skipped by rescans, counted by ``data_exhausted``) until the step commits."""
        self.prune(version)
        while True:
            groups, self.ready = take_oldest(self.ready, n - len(self.taken) - self.hold_back(n, version))
            if groups:
                self.taken += groups
                chunk(groups)
            if len(self.taken) >= n or self.data_exhausted() or self.state.finished is not None:
                break
            self.collect()
            self.prune(version)
        taken, self.taken = self.taken, []
        self.stale_in_batch, self.stale_dropped = self.stale_dropped, 0
        self.batch_taken(taken, version)
        return taken

    def take(self, n: int, version: int) -> list[Group]:
        """The ``n`` ready groups admitted at the oldest version, none past the staleness bound."""
        self.prune(version)
        groups, self.ready = take_oldest(self.ready, n)
        self.stale_in_batch, self.stale_dropped = self.stale_dropped, 0
        self.batch_taken(groups, version)
        return groups

    def hold_back(self, n: int, version: int) -> int:
        """How many of the batch's ``n`` places to keep for groups still being sampled that this batch,
        taken with the weights of ``version``, is the last one allowed to train (``last_chance``): all of
        them while the wait for them lasts (``StragglerWait``; docs/design.md §15.76 A straggler's last step
        waits for it), else 0. Arrived, they are the oldest admitted and take those places (``take_oldest``)."""
        if self.straggler_wait.factor <= 0:
            return 0
        here = {g.group_id for g in self.ready + self.taken}
        late = last_chance(self.state.open_groups, here, version, self.bound)
        if not late or not self.straggler_wait.holding(time.monotonic(), len(self.ready) + len(self.taken) >= n):
            return 0
        return min(len(late), n - len(self.taken))

    def batch_taken(self, groups: list[Group], version: int) -> None:
        waited = self.straggler_wait.taken(time.monotonic())
        if waited > 0:
            saved = sum(1 for g in groups if version - g.submit_version == self.bound)
            log.info("waited %.2fs for groups only the batch at v%d could still train: %d of them in it",
                     waited, version, saved)

    def prune(self, version: int) -> None:
        """What leaves ``ready`` before groups are handed to training: the settled, then the stale."""
        self.drop_settled()
        self.drop_stale(version)

    def drop_settled(self) -> None:
        """Ack untrained the ready groups the fold has settled since they completed here: a
        rejection that stands (docs/design.md §15.98 A written group is the trainer's to settle:
        one written before the group's ``GroupSampled``, folded after its samples were read) or a
        step that trained them. Trained, such a group would be both, and the gate, which freed its
        slots at the rejection, would have admitted one group too many. Every read of samples is
        followed by a fold before a group is handed out (``collect``, ``restore``), and any
        rejection that lands before the samples is in it. One set lookup per ready group (the
        batch and what waits beside it), never a walk of the fold."""
        settled = self.state.settled_groups
        dropped = [g for g in self.ready if g.group_id in settled]
        if dropped:
            self.ready = [g for g in self.ready if g.group_id not in settled]
            self.ack_settled(dropped)

    def ack_settled(self, groups: list[Group]) -> None:
        """Groups the fold settled while they were here: their entries acked untrained, as
        samples of a settled group are when they arrive (``add_samples``)."""
        for group in groups:
            log.warning("not training group %s: settled meanwhile (%s)", group.group_id,
                        self.state.rejected.get(group.group_id, "trained"))
        ack_untrained(self.r, self.cfg.run_id, [e for g in groups for e in g.entry_ids], self.lease)
        self.assembler.forget([g.group_id for g in groups])

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
        ready_ids = {g.group_id for g in self.ready + self.taken}
        return all(g.group_id in ready_ids for g in self.state.open_groups)

    def restore(self) -> None:
        """At resume, after the events fold: this consumer's whole pending list, the events
        written meanwhile, then the members dead-lettered before the crash (or just now), which
        still count towards settling their groups."""
        # the fold's own settled set answers for every group settled so far (``GroupAssembler.add`` asks it)
        self.settled_seen = (len(self.state.trained_order), len(self.state.rejected_order))
        self.add_samples(read_all_pending(self.r, self.cfg.run_id, CONSUMER, count=READ_COUNT, **self.limits))
        # The events written while the trainer resumed: a rejection written before some of those samples is
        # folded before their group is handed out, as after every read (``drop_settled``).
        self.follow_events()
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
        self.forget_settled()
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

    def forget_settled(self) -> None:
        """The groups the fold settled since the last call leave ``completed``: it would otherwise
        hold every group the trainer ever handed out (memory that grew with the run)."""
        trained, rejected = self.state.trained_order, self.state.rejected_order
        self.assembler.forget(trained[self.settled_seen[0]:])
        self.assembler.forget(rejected[self.settled_seen[1]:])
        self.settled_seen = (len(trained), len(rejected))

    def reject_unseen(self) -> None:
        """A group a worker reports sampled (``GroupSampled``, same MULTI as its samples) none
        of whose members reached this buffer, not even as a dead letter naming it (its entries
        did not decode): nothing would ever settle it, and with O = 0 the gate would wait for it
        forever. Rejected once noticed for ``2 × job_timeout`` and a read since then caught up."""
        # Membership in each, not their union: a set built at every read from every group handed out
        # grew with the run (O(groups so far) per read; ``completed`` now keeps only the unsettled ones).
        opened, completed = self.assembler.open, self.assembler.completed
        noticed = [g.group_id for g in self.state.open_groups if g.group_id in self.state.sampled
                   and g.group_id not in opened and g.group_id not in completed]
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
        held = self.assembler.held_entry_ids() | {e for g in self.ready + self.taken for e in g.entry_ids}
        found = read_unheld_pending(self.r, self.cfg.run_id, CONSUMER, held, invalid=invalid, **self.limits)
        if found:
            log.warning("picked up %d pending entries no read had returned (a lost reply?)", len(found))
            self.add_samples(found)

    def add_samples(self, entries: list[tuple[str, RolloutRecord]]) -> None:
        settled, duplicates = self.state.settled_groups, []
        for entry_id, sample in entries:
            group, dup = self.assembler.add(entry_id, sample, settled)
            if group is not None:
                self.admit(group)
            if dup is not None:
                duplicates.append(dup)
        ack_untrained(self.r, self.cfg.run_id, duplicates, self.lease)

    def add_invalid(self, samples: list[RolloutRecord | DeadLetter]) -> None:
        """Dead-lettered members of admitted groups (their GroupAdmitted precedes them, so
        call this after a fold): they settle their group instead of leaving it open."""
        for sample in samples:
            if sample.group_id in self.state.admitted:
                self.assembler.add_invalid(sample, self.state.settled_groups)

    def admit(self, group: Group) -> None:
        """Score a group that will grow no more; one ``score`` refuses is rejected with its reason.
        One the fold settled while it waited (a rejection by anyone, folded while it was open) is
        neither: its entries are acked untrained."""
        if group.group_id in self.state.settled_groups:
            self.ack_settled([group])
            return
        reason = self.score(group)
        if reason is None:
            self.ready.append(group)
        else:
            self.reject(group, reason)

    def reject(self, group: Group, reason: str) -> None:
        self.state.apply(reject_group(self.r, self.cfg.run_id, group.group_id, group.entry_ids, reason, self.lease))
        # Settled in the fold now, by this rejection or an earlier one (a producer's, folded while the group was
        # still open): the fold answers for its samples from here on. forget_settled would never see an earlier
        # rejection again, and the id would stay in ``completed`` for the rest of the run.
        self.assembler.forget([group.group_id])
