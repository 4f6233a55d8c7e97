"""The run's state as a fold over ``rl:{run}:events``: what any process (producer,
trainer, ``status``, ``up``'s progress display) needs, rebuilt from the log alone.

One rule every reader of the log shares (``rejection_stands``; ``rlstream audit`` applies it
too): once a worker wrote a group (``GroupSampled``), only the trainer settles it. A later
``GroupRejected`` by anyone else (a later run of the group's rq job whose draws failed, a
re-run after a hung or dead worker's) is void: the group's samples are in the stream and the
trainer trains them or rejects the group itself (docs/design.md §15.98 A written group is the
trainer's to settle)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Collection

from rlstream.core.messages import (
    DatasetExhausted,
    Evaluated,
    GroupAdmitted,
    GroupRejected,
    GroupSampled,
    Message,
    RunFinished,
    RunStarted,
    StepCommitted,
    WeightsPublished,
)

TRAINER = "trainer"  # ``GroupRejected.by`` of the trainer's rejections


def rejection_stands(msg: GroupRejected, rejected: Collection[str], sampled: Collection[str]) -> bool:
    """Whether ``msg`` settles its group, given the groups already ``rejected`` and ``sampled``
    before it in the log: the first rejection of the group, and, once a worker wrote the group,
    only the trainer's (or one with ``by`` empty, which no rlstream process writes: each names
    itself, and always has, so a log written before this rule follows it too when folded again)."""
    if msg.group_id in rejected:
        return False
    return msg.group_id not in sampled or msg.by in (TRAINER, "")


@dataclass
class RunState:
    """The fold. Processes apply every event as it arrives and ask the gate's questions
    (reserved, in flight) on every wake-up, so the aggregates are kept incrementally:
    answering must not cost O(groups ever admitted) on a long run."""

    published_version: int = 0
    latest_weights: WeightsPublished | None = None
    admitted: dict[str, GroupAdmitted] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # group_id -> reason
    rejected_order: list[str] = field(default_factory=list)  # ... in the order they were rejected (append-only)
    trained: set[str] = field(default_factory=set)
    trained_order: list[str] = field(default_factory=list)  # ... as they were trained (append-only)
    sampled: set[str] = field(default_factory=set)  # groups whose samples a worker wrote
    last_step: StepCommitted | None = None
    steps: int = 0
    exhausted_groups: int | None = None
    finished: RunFinished | None = None
    started: RunStarted | None = None
    rows_admitted: set[tuple[int, int]] = field(default_factory=set)  # (epoch, row)
    last_evaluated: int | None = None  # version of the newest Evaluated event
    track_groups: bool = True  # False: a worker's lean fold (versions, end of run), O(1) memory however long the run
    _settled: set[str] = field(default_factory=set)  # trained | rejected
    _open: dict[str, GroupAdmitted] = field(default_factory=dict)  # admitted, not settled (admission order)
    _reserved: int = 0  # samples of admitted groups not rejected
    _in_flight: int = 0  # samples of open groups
    _trained_samples: int = 0  # samples of admitted groups that were trained
    sampled_samples: int = 0  # samples workers wrote (GroupSampled), for the rollout rates
    sampled_tokens: int = 0  # ... and their generated tokens

    def apply(self, msg: Message) -> None:
        if not self.track_groups and isinstance(msg, (GroupAdmitted, GroupRejected, GroupSampled)):
            return
        if isinstance(msg, GroupAdmitted):
            self._admit(msg)
        elif isinstance(msg, GroupRejected):
            if rejection_stands(msg, self.rejected, self.sampled):
                self.rejected[msg.group_id] = msg.reason
                self.rejected_order.append(msg.group_id)
                admitted = self.admitted.get(msg.group_id)
                self._reserved -= admitted.group_size if admitted is not None else 0
                self._settle(msg.group_id)
        elif isinstance(msg, GroupSampled):
            if msg.group_id not in self.sampled:
                self.sampled_samples += msg.samples
                self.sampled_tokens += msg.tokens
            self.sampled.add(msg.group_id)
        elif isinstance(msg, StepCommitted):
            for gid in msg.group_ids if self.track_groups else ():
                if gid not in self.trained:
                    self.trained.add(gid)
                    self.trained_order.append(gid)
                    admitted = self.admitted.get(gid)
                    self._trained_samples += admitted.group_size if admitted is not None else 0
                    self._settle(gid)
            self.last_step = msg
            self.steps = max(self.steps, msg.step)
        elif isinstance(msg, WeightsPublished):
            if msg.version >= self.published_version:
                self.published_version = msg.version
                self.latest_weights = msg
        elif isinstance(msg, Evaluated):
            self.last_evaluated = msg.version
        elif isinstance(msg, DatasetExhausted):
            self.exhausted_groups = msg.groups
        elif isinstance(msg, RunFinished):
            self.finished = msg
        elif isinstance(msg, RunStarted):
            self.started = msg
            self.finished = None  # `rlstream up` on a finished run continues it (e.g. more max_steps)

    def _admit(self, msg: GroupAdmitted) -> None:
        if msg.group_id in self.admitted:  # a re-delivered event: already counted
            return
        self.admitted[msg.group_id] = msg
        self.rows_admitted.add((msg.epoch, msg.row_index))
        if msg.group_id not in self.rejected:
            self._reserved += msg.group_size
        if msg.group_id not in self._settled:
            self._open[msg.group_id] = msg
            self._in_flight += msg.group_size

    def _settle(self, group_id: str) -> None:
        self._settled.add(group_id)
        group = self._open.pop(group_id, None)
        if group is not None:
            self._in_flight -= group.group_size

    @property
    def settled_groups(self) -> set[str]:
        """Trained or rejected group ids (the live set: read it, do not change it)."""
        return self._settled

    @property
    def open_groups(self) -> list[GroupAdmitted]:
        """Admitted groups neither trained nor rejected: in flight somewhere."""
        return list(self._open.values())

    @property
    def unsampled_groups(self) -> list[GroupAdmitted]:
        """Open groups no worker has written yet: their rq job must exist (queued, running,
        or failed and about to be handled), else it was lost with Redis's last writes."""
        return [g for gid, g in self._open.items() if gid not in self.sampled]

    @property
    def reserved_samples(self) -> int:
        """accepted + reserved of the gate (docs/design.md §5 Versions and the gate): samples of
        every admitted group that was not rejected (a rejected group frees its slots)."""
        return self._reserved

    @property
    def in_flight_samples(self) -> int:
        return self._in_flight

    @property
    def trained_samples(self) -> int:
        """Samples of the admitted groups that were trained (as admitted: G each)."""
        return self._trained_samples
