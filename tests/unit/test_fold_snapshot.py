"""The fold recorded with each checkpoint (rlstream.core.fold_snapshot, docs/design.md §15.47
Processes start from the checkpoint's fold): it round-trips the run state exactly, is used only
while the events stream still holds its cursor and commit, and a resumed trainer folds only the
events after it, reaching the same state, weights and metrics.jsonl as a fold of the whole
stream."""
from __future__ import annotations

import pytest
from test_trainer_resume import RUN, add_group, admit, config, params

from rlstream.core import bus, fold_snapshot, keys
from rlstream.core.messages import GroupRejected, GroupSampled, StepCommitted, WeightsPublished
from rlstream.core.run_state import RunState
from rlstream.trainer.checkpoint import checkpoint_dir
from rlstream.trainer.trainer import Trainer

pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group


def folded(r) -> RunState:
    state = RunState()
    for _, msg in bus.iter_all_events(r, RUN):
        state.apply(msg)
    return state


def test_dump_and_load_round_trip_every_field(r):
    for row in range(4):
        admit(r, row)
    bus.xadd(r, keys.events(RUN), GroupSampled(group_id="e0-r0-a0", samples=2, worker_id="w", version=0))
    bus.xadd(r, keys.events(RUN), GroupRejected(group_id="e0-r1-a0", reason="why", by="producer"))
    bus.xadd(r, keys.events(RUN), WeightsPublished(version=0, uri="/w/v0", sha256="0" * 64, bytes=1))
    commit = bus.xadd(r, keys.events(RUN), StepCommitted(step=1, version=1, entry_ids=["1-0"], sample_ids=["s"],
                                                         group_ids=["e0-r2-a0"], metrics={"train/loss": 0.5}))
    state = folded(r)
    snap = fold_snapshot.load(fold_snapshot.dump(state, cursor=commit.decode(), commit_id=commit.decode(), step=1,
                                                 metrics_bytes=7))
    assert vars(snap.state) == vars(state)
    assert (snap.cursor, snap.step, snap.metrics_bytes) == (commit.decode(), 1, 7)
    assert snap.state.reserved_samples == state.reserved_samples and snap.state.in_flight_samples == 4
    assert fold_snapshot.agrees_with_events(r, RUN, snap)
    r.xdel(keys.events(RUN), commit)  # Redis lost it (an OS crash): the snapshot is not used
    assert not fold_snapshot.agrees_with_events(r, RUN, snap)


def test_resume_folds_only_the_events_after_the_checkpoint(r, tmp_path, monkeypatch):
    for row in range(3):
        add_group(r, row)
    cfg = config(tmp_path, dcp_save_interval=2, max_steps=3)
    first = Trainer(cfg, r, cfg.run_dir())
    assert first.run() == 3
    assert (checkpoint_dir(cfg.run_dir(), 2) / fold_snapshot.FOLD_FILE).is_file()
    metrics_before = (cfg.run_dir() / "metrics.jsonl").read_text()

    reads = []
    real = bus.read_events
    monkeypatch.setattr(bus, "read_events", lambda r_, run_id, after="0-0", **kw: reads.append(after) or real(
        r_, run_id, after, **kw))
    again = Trainer(cfg, r, cfg.run_dir())
    again.resume()
    assert reads and reads[0] != "0-0"  # started from a checkpoint's fold, not the stream's first entry
    assert again.step == 3 and vars(again.state) == vars(folded(r))
    assert all((a == b).all() for a, b in zip(params(first), params(again)))
    assert (cfg.run_dir() / "metrics.jsonl").read_text() == metrics_before
    again.lease.release()

    (cfg.run_dir() / "metrics.jsonl").write_text("")  # shorter than at the checkpoint: rebuilt from every event
    monkeypatch.undo()
    third = Trainer(cfg, r, cfg.run_dir())
    third.resume()
    third.lease.release()
    assert (cfg.run_dir() / "metrics.jsonl").read_text() == metrics_before


def test_start_fold_for_producer_and_workers(r, tmp_path):
    for row in range(2):
        add_group(r, row)
    cfg = config(tmp_path, dcp_save_interval=1, max_steps=2)
    Trainer(cfg, r, cfg.run_dir()).run()
    state, cursor = fold_snapshot.start_fold(cfg.run_dir(), r, RUN)
    assert cursor != "0-0" and state.steps == 2
    entries, _ = bus.read_events(r, RUN, cursor)
    for _, msg in entries:
        state.apply(msg)
    assert vars(state) == vars(folded(r))
    assert fold_snapshot.start_fold(tmp_path / "nowhere", r, RUN) == (RunState(), "0-0")


def test_workers_keep_a_lean_fold(r, tmp_path):
    """A worker's fold keeps versions and the end of the run, not one entry per group."""
    from rlstream.workers.events import EventFollower

    for row in range(2):
        add_group(r, row)
    cfg = config(tmp_path, dcp_save_interval=1, max_steps=2)
    Trainer(cfg, r, cfg.run_dir()).run()
    follower = EventFollower(r, RUN, on_finished=lambda: None, start=fold_snapshot.start_fold(cfg.run_dir(), r, RUN))
    assert follower.cursor != "0-0" and not follower.state.admitted and follower.state.steps == 2
    admit(r, 7)
    bus.xadd(r, keys.events(RUN), WeightsPublished(version=3, uri="/w/v3", sha256="0" * 64, bytes=1))
    follower.catch_up()
    assert not follower.state.admitted and not follower.state.open_groups
    assert follower.state.published_version == 3 and follower.state.latest_weights.version == 3


def test_an_admitted_row_from_before_jobs_carried_groups_loads_without_a_job_id():
    from rlstream.core.fold_snapshot import _admitted

    old = _admitted(["e0-r1-a0", 1, 0, 0, 3, 8])
    assert (old.group_id, old.submit_version, old.group_size, old.job_id) == ("e0-r1-a0", 3, 8, "")
    assert _admitted(["e0-r2-a0", 2, 0, 0, 3, 8, "run-e0-r1-a0"]).job_id == "run-e0-r1-a0"
    for bad in (["e0-r1-a0", 1, 0, 0, 3], ["e0-r1-a0", 1, 0, 0, 3, 8, 7], ["e0-r1-a0", "1", 0, 0, 3, 8]):
        with pytest.raises(ValueError, match="malformed admitted group"):
            _admitted(bad)
