"""The SDK's view of its run's log: a fold over ``rl:{run}:events`` that answers which sampler
snapshots and train states exist by name, how many steps were taken, and which version the
next snapshot gets; plus the public identities of snapshots
(``rlstream://<run>/sampler_weights/<name>``, ``rlstream://<run>/state/<name>``) and the check
of the names inside them.

An identity is resolved through the log, never opened as a path: the directory is derived from
the run directory and the name (one plain component), and verified against the digest its
event recorded (docs/design.md §15.42 Trust boundaries: nothing from Redis or a file is a path
or code).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import redis

from rlstream.core import bus
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import Message, OptimStepped, RunStarted, SamplerSaved, StateLoaded, StateSaved

SCHEME = "rlstream://"
KINDS = {"sampler_weights": "sampler snapshot", "state": "train state"}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_name(name: str, what: str) -> str:
    """A snapshot or state name: 1-128 letters, digits, '_', '.', '-', starting with a letter
    or digit (it becomes one directory name under the run)."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"{what} name {name!r} must be 1-128 letters, digits, '_', '.' or '-', starting with a "
                         "letter or digit (e.g. 'step-00010')")
    return name


def identity(run_id: str, kind: str, name: str) -> str:
    return f"{SCHEME}{run_id}/{kind}/{name}"


def parse_identity(path: str, run_id: str, kind: str) -> str:
    """The name inside ``path`` (an identity of this run and ``kind``; a bare name is taken
    as one too), else ValueError saying what was expected."""
    expected = identity(run_id, kind, "<name>")
    if not isinstance(path, str):
        raise ValueError(f"expected a {KINDS[kind]} identity such as {expected}, got {type(path).__name__}")
    if not path.startswith(SCHEME):
        return check_name(path, KINDS[kind])
    parts = path.removeprefix(SCHEME).split("/")
    if len(parts) != 3 or parts[1] != kind:
        raise ValueError(f"{path!r} is not a {KINDS[kind]} identity ({expected})")
    if parts[0] != run_id:
        raise ValueError(f"{path!r} belongs to run {parts[0]!r}, but this service is run {run_id!r}: reconnect to "
                         f"that run (trainer_job_id={parts[0]!r}) to use it")
    return check_name(parts[2], KINDS[kind])


@dataclass
class Ledger:
    """What the SDK needs from the run's events: steps, snapshots and states by name (the
    newest event of a name wins)."""

    step: int = 0  # the training client's step after the newest step or state load
    steps_logged: int = 0  # OptimStepped events ever written (a loaded state does not undo them)
    samplers: dict[str, SamplerSaved] = field(default_factory=dict)
    states: dict[str, StateSaved] = field(default_factory=dict)
    state_order: list[str] = field(default_factory=list)  # names, oldest save first
    last_version: int = 0
    started: RunStarted | None = None
    cursor: str = "0-0"

    def apply(self, msg: Message) -> None:
        if isinstance(msg, OptimStepped):
            self.step, self.steps_logged = msg.step, self.steps_logged + 1
        elif isinstance(msg, SamplerSaved):
            self.samplers[msg.name] = msg
            self.last_version = max(self.last_version, msg.version)
        elif isinstance(msg, StateSaved):
            self.states[msg.name] = msg
            self.state_order = [n for n in self.state_order if n != msg.name] + [msg.name]
        elif isinstance(msg, StateLoaded):
            self.step = msg.step
        elif isinstance(msg, RunStarted) and self.started is None:
            self.started = msg

    def follow(self, r: redis.Redis, run_id: str) -> Ledger:
        """Fold the events written since the last call (this process's own included)."""
        entries, self.cursor = bus.read_events(r, run_id, self.cursor)
        for _, msg in entries:
            self.apply(msg)
        return self

    def sampler(self, name: str, run_id: str) -> SamplerSaved:
        if name not in self.samplers:
            known = ", ".join(sorted(self.samplers)) or "none yet"
            raise RlstreamError(f"run {run_id} has no sampler snapshot {name!r} (saved: {known}); save one with "
                                "training_client.save_weights_for_sampler(name)")
        return self.samplers[name]

    def state(self, name: str, run_id: str) -> StateSaved:
        if name not in self.states:
            known = ", ".join(self.state_order) or "none yet"
            raise RlstreamError(f"run {run_id} has no saved state {name!r} (saved: {known}); save one with "
                                "training_client.save_state(name)")
        return self.states[name]
