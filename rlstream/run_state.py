"""The run's state as a fold over ``rl:{run}:events``: what any process (producer,
trainer, ``status``, ``up``'s progress display) needs, rebuilt from the log alone."""
from __future__ import annotations

from dataclasses import dataclass, field

from rlstream.messages import (
    DatasetExhausted, Evaluated, GroupAdmitted, GroupRejected, GroupSampled, Message, RunFinished, RunStarted,
    StepCommitted, WeightsPublished,
)


@dataclass
class RunState:
    published_version: int = 0
    latest_weights: WeightsPublished | None = None
    admitted: dict[str, GroupAdmitted] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # group_id -> reason
    trained: set[str] = field(default_factory=set)
    sampled: set[str] = field(default_factory=set)  # groups whose samples a worker wrote
    last_step: StepCommitted | None = None
    steps: int = 0
    exhausted_groups: int | None = None
    finished: RunFinished | None = None
    started: RunStarted | None = None
    rows_admitted: set[tuple[int, int]] = field(default_factory=set)  # (epoch, row)
    last_evaluated: int | None = None  # version of the newest Evaluated event

    def apply(self, msg: Message) -> None:
        if isinstance(msg, GroupAdmitted):
            self.admitted[msg.group_id] = msg
            self.rows_admitted.add((msg.epoch, msg.row_index))
        elif isinstance(msg, GroupRejected):
            self.rejected.setdefault(msg.group_id, msg.reason)
        elif isinstance(msg, GroupSampled):
            self.sampled.add(msg.group_id)
        elif isinstance(msg, StepCommitted):
            self.trained.update(msg.group_ids)
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

    @property
    def settled_groups(self) -> set[str]:
        return self.trained | set(self.rejected)

    @property
    def open_groups(self) -> list[GroupAdmitted]:
        """Admitted groups neither trained nor rejected: in flight somewhere."""
        settled = self.settled_groups
        return [g for gid, g in self.admitted.items() if gid not in settled]

    @property
    def unsampled_groups(self) -> list[GroupAdmitted]:
        """Open groups no worker has written yet: their rq job must exist (queued, running,
        or failed and about to be handled), else it was lost with Redis's last writes."""
        return [g for g in self.open_groups if g.group_id not in self.sampled]

    @property
    def reserved_samples(self) -> int:
        """accepted + reserved of DESIGN.md s.4: samples of every admitted group that was not
        rejected (a rejected group frees its slots)."""
        return sum(g.group_size for gid, g in self.admitted.items() if gid not in self.rejected)

    @property
    def in_flight_samples(self) -> int:
        return sum(g.group_size for g in self.open_groups)
