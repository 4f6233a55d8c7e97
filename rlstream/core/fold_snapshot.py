"""The fold at a checkpoint (docs/design.md §15.47 Processes start from the checkpoint's fold):
each train-state checkpoint also records the run state (``RunState``) and the events cursor
it was folded to, as ``fold.json`` inside the sealed checkpoint directory. A (re)starting
trainer, producer or worker loads the newest one and folds only the events after its cursor,
instead of the whole events stream from its first entry: start-up no longer grows with the
run.

A snapshot is used only when the events stream still holds both its cursor and the
``StepCommitted`` of its step at the recorded id (Redis may have lost its last second in an
OS crash, §15.37 The commit checks that Redis kept what the trainer read); otherwise the
reader folds from the beginning, as before. Messages are stored with the wire codec
(base64), so the snapshot decodes under the same strict checks; admitted groups, one per
group ever admitted, as plain rows.
"""
from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import redis

from rlstream.core import keys
from rlstream.core.bus import FIELD
from rlstream.core.codec import DecodeError, decode, encode
from rlstream.core.messages import SCHEMA_VERSION, GroupAdmitted, Message, StepCommitted
from rlstream.core.run_state import RunState

log = logging.getLogger(__name__)
FOLD_FILE = "fold.json"
FORMAT = "rlstream-fold"
ADMITTED_FIELDS = ("group_id", "row_index", "epoch", "attempt", "submit_version", "group_size", "job_id")
_ADMITTED_DEFAULTS = {"schema_version": SCHEMA_VERSION, "kind": "group_admitted", "job_id": ""}
_ADMITTED_SET = frozenset(ADMITTED_FIELDS)


@dataclass
class Snapshot:
    state: RunState
    cursor: str  # the last event folded into ``state``
    commit_id: str  # the StepCommitted of ``step``
    step: int
    metrics_bytes: int  # metrics.jsonl's size at the checkpoint (the lines the events before the cursor record)
    path: Path | None = None  # the checkpoint directory it came from


def _enc(msg: Message | None) -> str | None:
    return None if msg is None else base64.b64encode(encode(msg)).decode()


def _dec(text: str | None) -> Message | None:
    return None if text is None else decode(base64.b64decode(text))


def _admitted(row: list) -> GroupAdmitted:
    """A ``GroupAdmitted`` from its snapshot row. There is one per group ever admitted:
    building each through pydantic (validation ~50 µs, ``model_construct`` ~30 µs) made
    loading grow visibly with the run, so the row's types are checked here and the frozen
    message's attributes set as pydantic itself stores them (~2 µs). A row of a snapshot written
    before jobs carried several groups has no job id."""
    if (len(row) not in (len(ADMITTED_FIELDS) - 1, len(ADMITTED_FIELDS)) or not isinstance(row[0], str)
            or not all(type(v) is int for v in row[1:6]) or (len(row) == 7 and not isinstance(row[6], str))):
        raise ValueError(f"malformed admitted group in fold snapshot: {row!r:.200}")
    msg = GroupAdmitted.__new__(GroupAdmitted)
    object.__setattr__(msg, "__dict__", {**_ADMITTED_DEFAULTS, **dict(zip(ADMITTED_FIELDS, row))})
    object.__setattr__(msg, "__pydantic_fields_set__", _ADMITTED_SET)
    object.__setattr__(msg, "__pydantic_extra__", None)
    object.__setattr__(msg, "__pydantic_private__", None)
    return msg


def dump(state: RunState, *, cursor: str, commit_id: str, step: int, metrics_bytes: int) -> str:
    return json.dumps({
        "format": FORMAT, "version": 1, "cursor": cursor, "commit_id": commit_id, "step": step,
        "metrics_bytes": metrics_bytes,
        "state": {
            "published_version": state.published_version, "latest_weights": _enc(state.latest_weights),
            "admitted": [[getattr(g, f) for f in ADMITTED_FIELDS] for g in state.admitted.values()],
            "rejected": state.rejected,
            "trained": sorted(state.trained), "sampled": sorted(state.sampled), "last_step": _enc(state.last_step),
            "steps": state.steps, "exhausted_groups": state.exhausted_groups, "finished": _enc(state.finished),
            "started": _enc(state.started), "rows_admitted": sorted(state.rows_admitted),
            "last_evaluated": state.last_evaluated, "settled": sorted(state.settled_groups),
            "open": list(state._open), "reserved": state._reserved, "in_flight": state._in_flight,
            "trained_samples": state._trained_samples,
            "sampled_samples": state.sampled_samples, "sampled_tokens": state.sampled_tokens,
        },
    })


def load(text: str) -> Snapshot:
    data = json.loads(text)
    if data.get("format") != FORMAT or data.get("version") != 1:
        raise ValueError(f"not a fold snapshot of this version: {data.get('format')!r} {data.get('version')!r}")
    s = data["state"]
    admitted = [_admitted(row) for row in s["admitted"]]
    state = RunState(
        published_version=s["published_version"], latest_weights=_dec(s["latest_weights"]),
        admitted={g.group_id: g for g in admitted}, rejected=dict(s["rejected"]),
        # the dict's order (JSON keeps it) is the rejections'; the tally reads trained_order only for what is new
        rejected_order=list(s["rejected"]), trained=set(s["trained"]), trained_order=list(s["trained"]),
        sampled=set(s["sampled"]), last_step=_dec(s["last_step"]), steps=s["steps"],
        exhausted_groups=s["exhausted_groups"], finished=_dec(s["finished"]), started=_dec(s["started"]),
        rows_admitted={tuple(x) for x in s["rows_admitted"]}, last_evaluated=s["last_evaluated"],
        sampled_samples=s.get("sampled_samples", 0), sampled_tokens=s.get("sampled_tokens", 0),
    )
    state._settled = set(s["settled"])
    state._open = {gid: state.admitted[gid] for gid in s["open"]}
    state._reserved, state._in_flight, state._trained_samples = s["reserved"], s["in_flight"], s["trained_samples"]
    return Snapshot(state, data["cursor"], data["commit_id"], data["step"], data["metrics_bytes"])


def agrees_with_events(r: redis.Redis, run_id: str, snap: Snapshot) -> bool:
    """The events stream still holds the snapshot's cursor and its step's ``StepCommitted``."""
    stream = keys.events(run_id)
    at_cursor = r.xrange(stream, snap.cursor, snap.cursor, count=1) if snap.cursor != "0-0" else [True]
    at_commit = r.xrange(stream, snap.commit_id, snap.commit_id, count=1)
    if not at_cursor or not at_commit:
        return False
    try:
        committed = decode(at_commit[0][1].get(FIELD, b""))
    except DecodeError:
        return False
    return isinstance(committed, StepCommitted) and committed.step == snap.step


def candidates(run_dir: Path) -> Iterator[Path]:
    """Checkpoint directories holding a fold snapshot, newest step first."""
    paths = [p for p in (run_dir / "checkpoints").glob("step-*") if p.name[5:].isdigit() and (p / FOLD_FILE).is_file()]
    yield from sorted(paths, key=lambda p: int(p.name[5:]), reverse=True)


def read(path: Path) -> Snapshot | None:
    try:
        snap = load((path / FOLD_FILE).read_text())
    except (OSError, ValueError, KeyError, TypeError, DecodeError) as exc:
        log.warning("ignoring the fold snapshot of %s: %s", path, exc)
        return None
    snap.path = path
    return snap


def lean(state: RunState) -> RunState:
    """What a worker needs of a run state: versions, evaluation, start and end of the run;
    no group bookkeeping (it keeps none while following either)."""
    return RunState(published_version=state.published_version, latest_weights=state.latest_weights,
                    last_step=state.last_step, steps=state.steps, finished=state.finished, started=state.started,
                    last_evaluated=state.last_evaluated, exhausted_groups=state.exhausted_groups, track_groups=False)


def start_fold(run_dir: Path | None, r: redis.Redis, run_id: str) -> tuple[RunState, str]:
    """(state, cursor) to fold on from: the newest checkpoint's snapshot the events agree
    with, else an empty state at the stream's beginning. For the producer and workers, which
    do not load the checkpoint itself (the trainer checks the checkpoint's digest too)."""
    for path in candidates(run_dir) if run_dir is not None and run_dir.is_dir() else ():
        snap = read(path)
        if snap is not None and agrees_with_events(r, run_id, snap):
            log.info("folding the events from %s's snapshot (step %d, after event %s)", path.name, snap.step,
                     snap.cursor)
            return snap.state, snap.cursor
    return RunState(), "0-0"
