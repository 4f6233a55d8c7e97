"""The rollouts archive (rlstream.core.archive) and the trainer's archive-then-trim pass
(trainer/retention.py), on fakeredis: what is archived and trimmed, what never is (pending,
undelivered), every crash point between segment, manifest and trim, and damaged segments."""
from __future__ import annotations

import json
import os

import pytest

from rlstream.core import keys
from rlstream.core.archive import Archive, ArchiveError, all_rollouts, fetch_rollouts
from rlstream.trainer.retention import archive_and_trim, prune_checkpoints, safe_bound

RUN = "arch"
STREAM = keys.rollouts(RUN)
pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group


def add(r, n: int) -> list[str]:
    return [r.xadd(STREAM, {b"m": f"payload-{r.xlen(STREAM)}-{i}".encode()}).decode() for i in range(n)]


def deliver(r, n: int) -> list[str]:
    reply = r.xreadgroup(keys.TRAINER_GROUP, "trainer-0", {STREAM: ">"}, count=n)
    return [e[0].decode() for e in reply[0][1]] if reply else []


def whole(r, archive) -> list[tuple[str, bytes]]:
    return list(all_rollouts(r, archive))


def test_only_acked_entries_are_archived_and_trimmed(r, tmp_path):
    ids = add(r, 10)
    before = [(i, r.xrange(STREAM, i, i)[0][1][b"m"]) for i in ids]
    delivered = deliver(r, 6)
    r.xack(STREAM, keys.TRAINER_GROUP, *delivered[:2], delivered[3])  # ids[2] stays pending
    archive = Archive(tmp_path, RUN)
    [segment], trimmed = archive_and_trim(r, archive, covered_step=1)
    assert (segment.first_id, segment.last_id, segment.entries) == (ids[0], ids[1], 2)
    assert trimmed == 2
    assert [e[0].decode() for e in r.xrange(STREAM)] == ids[2:]  # the pending one and everything after stay
    assert whole(r, archive) == before  # archive + stream = the stream as it was
    r.xack(STREAM, keys.TRAINER_GROUP, delivered[2], *delivered[4:])
    [segment], trimmed = archive_and_trim(r, archive, covered_step=2)
    assert (segment.first_id, segment.last_id) == (ids[2], ids[5])  # undelivered ids[6:] untouched
    assert [e[0].decode() for e in r.xrange(STREAM)] == ids[6:]
    assert whole(r, archive) == before
    assert fetch_rollouts(r, archive, [ids[0], ids[4], ids[9]]) == dict(before[i] for i in (0, 4, 9))
    assert archive.problems() == []


def test_nothing_delivered_nothing_archived(r, tmp_path):
    add(r, 3)
    assert archive_and_trim(r, Archive(tmp_path, RUN), covered_step=1) == ([], 0)
    assert r.xlen(STREAM) == 3
    assert safe_bound(r, STREAM) == "0-1"


def test_segment_is_self_describing_json_lines(r, tmp_path):
    ids = add(r, 2)
    r.xack(STREAM, keys.TRAINER_GROUP, *deliver(r, 2))
    archive_and_trim(r, Archive(tmp_path, RUN), covered_step=7)
    lines = (tmp_path / "archive" / "seg-000001.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    assert header["format"] == "rlstream-rollouts-archive" and header["version"] == 1
    assert header["covered_step"] == 7 and header["stream"] == STREAM
    assert [json.loads(line)["id"] for line in lines[1:]] == ids
    manifest = json.loads((tmp_path / "archive" / "manifest.json").read_text())
    assert manifest["upto"] == ids[-1] and manifest["segments"][0]["entries"] == 2


def test_crash_after_segment_before_manifest_is_repaired(r, tmp_path, monkeypatch):
    """Killed between the segment's rename and the manifest's: an orphan file, no trim. The
    next pass writes the same segment name again, whole, and trims."""
    add(r, 4)
    before = whole(r, Archive(tmp_path, RUN))
    r.xack(STREAM, keys.TRAINER_GROUP, *deliver(r, 4))
    archive = Archive(tmp_path, RUN)

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(Archive, "_write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        archive_and_trim(r, archive, covered_step=1)
    monkeypatch.undo()
    assert (tmp_path / "archive" / "seg-000001.jsonl").exists() and r.xlen(STREAM) == 4
    assert whole(r, archive) == before  # the orphan is not read; the stream still holds everything
    archive_and_trim(r, archive, covered_step=1)
    assert r.xlen(STREAM) == 0 and whole(r, archive) == before
    assert [s.file for s in archive.segments()] == ["seg-000001.jsonl"]


def test_crash_mid_segment_write_leaves_no_segment(r, tmp_path, monkeypatch):
    add(r, 3)
    r.xack(STREAM, keys.TRAINER_GROUP, *deliver(r, 3))
    real_replace = os.replace

    def killed(src, dst):
        if str(dst).endswith(".jsonl"):
            raise KeyboardInterrupt("killed before the rename")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        archive_and_trim(r, Archive(tmp_path, RUN), covered_step=1)
    monkeypatch.undo()
    assert not list((tmp_path / "archive").glob("seg-*.jsonl")) and r.xlen(STREAM) == 3
    archive_and_trim(r, Archive(tmp_path, RUN), covered_step=1)
    assert r.xlen(STREAM) == 0 and len(list(all_rollouts(r, Archive(tmp_path, RUN)))) == 3


def test_crash_after_manifest_before_trim_reads_each_entry_once(r, tmp_path, monkeypatch):
    add(r, 3)
    r.xack(STREAM, keys.TRAINER_GROUP, *deliver(r, 3))
    before = whole(r, Archive(tmp_path, RUN))
    monkeypatch.setattr(type(r), "xtrim", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("killed")))
    with pytest.raises(KeyboardInterrupt):
        archive_and_trim(r, Archive(tmp_path, RUN), covered_step=1)
    monkeypatch.undo()
    assert r.xlen(STREAM) == 3 and whole(r, Archive(tmp_path, RUN)) == before  # both hold them: read once
    segments, trimmed = archive_and_trim(r, Archive(tmp_path, RUN), covered_step=2)
    assert segments == [] and trimmed == 3


def test_rewind_drops_segments_the_events_no_longer_record(r, tmp_path):
    add(r, 2)
    r.xack(STREAM, keys.TRAINER_GROUP, *deliver(r, 2))
    archive = Archive(tmp_path, RUN)
    archive_and_trim(r, archive, covered_step=5)
    add(r, 2)
    r.xack(STREAM, keys.TRAINER_GROUP, *deliver(r, 2))
    archive_and_trim(r, archive, covered_step=10)
    dropped = archive.rewind(steps=7)
    assert [s.covered_step for s in dropped] == [10]
    assert [s.covered_step for s in archive.segments()] == [5]
    assert (tmp_path / "archive" / "discarded" / dropped[0].file).exists()
    assert archive.rewind(steps=7) == []


def test_damaged_or_missing_segment_is_an_error_never_skipped(r, tmp_path):
    add(r, 3)
    r.xack(STREAM, keys.TRAINER_GROUP, *deliver(r, 3))
    archive_and_trim(r, Archive(tmp_path, RUN), covered_step=1)
    path = tmp_path / "archive" / "seg-000001.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"id"', b'"iD"', 1))
    with pytest.raises(ArchiveError, match="damaged"):
        whole(r, Archive(tmp_path, RUN))
    assert "damaged" in Archive(tmp_path, RUN).problems()[0]
    path.unlink()
    with pytest.raises(ArchiveError, match="missing.*Restore it"):
        whole(r, Archive(tmp_path, RUN))
    (tmp_path / "archive" / "manifest.json").write_text("{not json")
    with pytest.raises(ArchiveError, match="manifest"):
        whole(r, Archive(tmp_path, RUN))


def test_prune_checkpoints_keeps_newest_and_pinned(tmp_path):
    from test_checkpoint import fake_checkpoint

    for step in (10, 20, 30, 40):
        fake_checkpoint(tmp_path, step, f"{step}-0")
    (tmp_path / "checkpoints" / "step-10.keep").touch()
    removed = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in removed] == ["step-20"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*") if p.is_dir()) == \
        ["step-10", "step-30", "step-40"]
    assert prune_checkpoints(tmp_path, keep=0) == []


def test_a_large_pass_is_split_into_bounded_segments(r, tmp_path, monkeypatch):
    from rlstream.trainer import retention

    monkeypatch.setattr(retention, "SEGMENT_BYTES", 30)  # each payload is ~11 bytes: 3 a segment
    add(r, 7)
    before = whole(r, Archive(tmp_path, RUN))
    r.xack(STREAM, keys.TRAINER_GROUP, *deliver(r, 7))
    segments, trimmed = archive_and_trim(r, Archive(tmp_path, RUN), covered_step=1)
    assert [s.entries for s in segments] == [3, 3, 1] and trimmed == 7
    assert whole(r, Archive(tmp_path, RUN)) == before
