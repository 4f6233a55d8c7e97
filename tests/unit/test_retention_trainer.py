"""The trainer's retention on fakeredis (docs/design.md §15.45 Archive, then trim; §15.48 A
memory guard before Redis refuses writes): each checkpoint archives and trims what it
covers, the audit and export read archive + stream, a resume replays from the archive, and
memory pressure makes the trainer checkpoint before its interval."""
from __future__ import annotations

import pytest
from test_trainer_resume import RUN, add_group, config, params

from rlstream.core import keys
from rlstream.core.archive import Archive
from rlstream.ops.audit import collect_audit
from rlstream.ops.export import export_lines
from rlstream.ops.status import archive_status
from rlstream.trainer import retention
from rlstream.trainer.checkpoint import checkpoint_dir
from rlstream.trainer.trainer import Trainer

pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group


def test_checkpoints_archive_and_trim_and_every_reader_follows(r, tmp_path):
    for row in range(4):
        add_group(r, row)
    cfg = config(tmp_path, dcp_save_interval=1, max_steps=3)
    first = Trainer(cfg, r, cfg.run_dir())
    assert first.run() == 3
    archive = Archive(cfg.run_dir(), RUN)
    assert [s.covered_step for s in archive.segments()] == [1, 2, 3]
    assert r.xlen(keys.rollouts(RUN)) == 2  # the fourth group: pending (read, never trained), so never archived
    report = collect_audit(r, RUN, cfg.run_dir())
    assert report.ok and report.samples_trained == 6 and report.rollouts_read == 8 and report.rollouts_archived == 6
    lines = list(export_lines(r, RUN, cfg.run_dir()))
    assert [(x["step"], x["reward"]) for x in lines] == [(1, 0.0), (1, 1.0), (2, 0.0), (2, 1.0), (3, 0.0), (3, 1.0)]
    # Every checkpoint gone: a resume replays all three steps from the archive alone.
    for step in (1, 2, 3):
        (checkpoint_dir(cfg.run_dir(), step) / "manifest.json").unlink()
    again = Trainer(cfg, r, cfg.run_dir())
    again.resume()
    again.lease.release()
    assert again.step == 3 and all((a == b).all() for a, b in zip(params(first), params(again)))
    status = archive_status(cfg.run_dir(), RUN)
    assert (status["segments"], status["rollouts"]) == (3, 6) and "MISSING" not in status
    (archive.dir / archive.segments()[2].file).rename(archive.dir / "elsewhere")
    assert archive_status(cfg.run_dir(), RUN)["MISSING"] == archive.segments()[2].file
    (archive.dir / "elsewhere").rename(archive.dir / archive.segments()[2].file)
    # A damaged segment fails the audit, naming it.
    path = archive.dir / archive.segments()[0].file
    path.write_bytes(path.read_bytes()[:-5] + b"xxxx\n")
    report = collect_audit(r, RUN, cfg.run_dir())
    assert not report.ok and path.name in report.lines()[-1] and "damaged" in report.lines()[-1]


def test_memory_pressure_checkpoints_before_the_interval(r, tmp_path, monkeypatch):
    """Under pressure, a checkpoint (archive + trim) every tenth of the interval, not every step."""
    for row in range(2):
        add_group(r, row)
    cfg = config(tmp_path, dcp_save_interval=20, max_steps=2, save_final_checkpoint=False)
    monkeypatch.setattr(retention, "memory_pressure", lambda r_, high_water: 0.9)
    assert Trainer(cfg, r, cfg.run_dir()).run() == 2
    assert sorted(p.name for p in (cfg.run_dir() / "checkpoints").iterdir()) == ["step-2"]  # not step-1 too
    assert [s.covered_step for s in Archive(cfg.run_dir(), RUN).segments()] == [2]


def test_no_pressure_no_early_checkpoint(r, tmp_path):
    for row in range(2):
        add_group(r, row)
    cfg = config(tmp_path, dcp_save_interval=100, max_steps=2, save_final_checkpoint=False)
    assert Trainer(cfg, r, cfg.run_dir()).run() == 2  # fakeredis has no INFO: no pressure
    assert not (cfg.run_dir() / "checkpoints").exists() and not Archive(cfg.run_dir(), RUN).segments()


def test_memory_is_asked_at_most_once_a_second(r, tmp_path, monkeypatch):
    """docs/design.md §15.85 Samples decode by the batch: one INFO a second at most, not one a step."""
    cfg = config(tmp_path, dcp_save_interval=10)
    keeper = retention.Retention(r, cfg, tmp_path, lease=None)
    keeper.enabled = True
    asked, now = [], {"t": 100.0}
    monkeypatch.setattr(retention, "memory_pressure", lambda r_, high_water: asked.append(now["t"]))
    monkeypatch.setattr(retention.time, "monotonic", lambda: now["t"])
    for step in range(1, 30):
        keeper.pressed(step)
        now["t"] += 0.25
    assert asked == [100.0, 101.0, 102.0, 103.0, 104.0, 105.0, 106.0, 107.0]
