"""A full disk while the run writes its directory (rlstream.core.disk): no half-written file or
directory a reader trusts, and one ``DiskFull`` line naming the path and the space needed.
tests/e2e/test_full_disk.py fills a real tmpfs under a real run."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from rlstream.core import weights
from rlstream.core.archive import _atomic_write
from rlstream.core.disk import DiskFull, disk_full_error, redis_refusal
from rlstream.core.metrics import MetricsLog, read_metrics


def enospc(path: Path | str | None = None) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), *([str(path)] if path else []))


def test_weights_directory_half_written_is_removed_and_named(tmp_path: Path) -> None:
    root = tmp_path / "weights"
    weights.write_dir(root / "v1", lambda tmp: (tmp.mkdir(parents=True), (tmp / "w.bin").write_bytes(b"x" * 5000)),
                      version=1)

    def fill(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        (tmp / "w.bin").write_bytes(b"x" * 100)
        raise enospc(tmp / "w.bin")

    with pytest.raises(DiskFull) as caught:
        weights.write_dir(root / "v2", fill, version=2)
    text = str(caught.value)
    assert f"writing weights {root / 'v2'} (" in text and "it needs about 5.1 KiB" in text, text  # v1 with its manifest
    assert "free space on that filesystem" in text
    assert sorted(p.name for p in root.iterdir()) == ["v1"]  # no v2, no .tmp-v2
    assert weights.complete_versions(root) == [1]



def test_a_linked_weights_directory_half_written_is_removed_and_its_source_kept(tmp_path: Path, monkeypatch) -> None:
    """The trainer's background writer (weights.write_linked_dir, docs/design.md §15.89 Weights link
    their unchanged files; the steps run on a frozen heap): a full disk after the links are made
    leaves no temp directory and no v2, and v1, whose files v2 had linked, complete and verified."""
    root = tmp_path / "weights"
    same = {"config.json": weights.SameFile.of(b'{"a": 1}')}
    known: dict = {}
    digest, _, _ = weights.write_linked_dir(root / "v1", lambda tmp: (tmp / "w.bin").write_bytes(b"x" * 50),
                                            version=1, same=same, source=None, known=known)

    def manifest_on_a_full_disk(tmp: Path, *_) -> None:  # the last write: every link is made by then
        assert (tmp / "config.json").stat().st_nlink == 2  # linked to v1's
        raise enospc(tmp / weights.MANIFEST)

    monkeypatch.setattr(weights, "_write_manifest", manifest_on_a_full_disk)
    with pytest.raises(DiskFull):
        weights.write_linked_dir(root / "v2", lambda tmp: (tmp / "w.bin").write_bytes(b"y" * 10), version=2,
                                 same=same, source=root / "v1", known=known)
    monkeypatch.undo()
    assert sorted(p.name for p in root.iterdir()) == ["v1"]  # no v2, no .tmp-v2
    weights.verify(root / "v1", digest)
    assert (root / "v1" / "config.json").stat().st_nlink == 1

def test_archive_file_is_whole_or_absent(tmp_path: Path) -> None:
    def lines():
        yield b"a\n"
        raise enospc()

    target = tmp_path / "archive" / "seg-000002.jsonl"
    target.parent.mkdir()
    with pytest.raises(DiskFull, match="writing the archive file .*seg-000002.jsonl"):
        _atomic_write(target, lines())
    assert list(target.parent.iterdir()) == []


def test_a_first_archive_segment_says_what_it_needs(tmp_path: Path, monkeypatch) -> None:
    """No older segment to go by: the lines the full disk refused are counted, not guessed."""
    from rlstream.core import archive

    real_open = open

    class FullAfter:
        """A file on a disk that takes ``room`` bytes."""

        def __init__(self, path, mode, room: int = 1500):
            self.f, self.room = real_open(path, mode), room

        def write(self, data: bytes) -> int:
            if len(data) > self.room:
                raise enospc()
            self.room -= len(data)
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    monkeypatch.setattr(archive, "open", FullAfter, raising=False)
    target = tmp_path / "archive" / "seg-000001.jsonl"
    target.parent.mkdir()
    with pytest.raises(DiskFull) as caught:
        _atomic_write(target, (b"x" * 999 + b"\n" for _ in range(10)))  # 10,000 bytes; one fits
    assert "it needs about 9.8 KiB" in str(caught.value), caught.value
    assert list(target.parent.iterdir()) == []


def test_metrics_line_is_whole_or_absent(tmp_path: Path, monkeypatch) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1})
    real_write = os.write

    def half_then_full(fd: int, data) -> int:
        real_write(fd, bytes(data[: len(data) // 2]))
        raise enospc()

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(DiskFull, match="writing metrics .*metrics.jsonl"):
        log.write({"step": 2, "loss": 0.5})
    monkeypatch.setattr(os, "write", real_write)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1}]  # no torn line for every reader to trip on


def test_disk_full_is_found_behind_torch_checkpoint_exceptions() -> None:
    from torch.distributed.checkpoint.api import CheckpointException

    cause = enospc("/x/dcp/__0_0.distcp")
    wrapped = CheckpointException("save failed", {0: (cause, None)})
    assert disk_full_error(wrapped) is cause
    try:
        try:
            raise cause
        except OSError as exc:
            raise RuntimeError("while writing") from exc
    except RuntimeError as outer:
        assert disk_full_error(outer) is cause
    assert disk_full_error(OSError(errno.EACCES, "denied")) is None
    rust = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")  # safetensors
    assert disk_full_error(rust).errno == errno.ENOSPC
    import redis

    misconf = redis.ResponseError("MISCONF Errors writing to the AOF file: No space left on device")
    assert disk_full_error(misconf) is None and redis_refusal(misconf) == str(misconf)  # Redis's disk, not ours


def test_checkpoint_half_written_is_removed(tmp_path: Path, monkeypatch) -> None:
    import torch

    from rlstream.trainer import checkpoint

    def train_state_then_full(directory: Path, *args) -> None:
        directory.mkdir(parents=True)
        (directory / "__0_0.distcp").write_bytes(b"1")
        raise enospc(directory / "__0_0.distcp")

    monkeypatch.setattr(checkpoint, "_save_train_state", train_state_then_full)
    state = checkpoint.CheckpointState(step=3, version=3, events_cursor="0-0", rows_admitted=0)
    with pytest.raises(DiskFull, match=r"writing checkpoint .*checkpoints/step-3"):
        checkpoint.save_checkpoint(tmp_path, state, torch.nn.Linear(2, 2), None, None)
    assert list((tmp_path / "checkpoints").iterdir()) == []  # no step-3, no .tmp-step-3


def test_up_stops_the_run_on_a_full_disk_instead_of_restarting(tmp_path: Path) -> None:
    import subprocess
    import sys

    from rlstream.core.errors import RunFailed
    from rlstream.core.run_state import RunState
    from rlstream.launcher import Child, _check_child

    log_path = tmp_path / "trainer.log"
    log_path.write_text("rlstream: no space left on device writing weights /r/weights/v4 (0 B free there; it needs "
                        "about 1.0 MiB): free space on that filesystem\n")
    process = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({DiskFull.exit_code})"])
    process.wait()
    child = Child("trainer", "trainer", process, log_path)
    with pytest.raises(RunFailed) as caught:
        _check_child(child, RunState(), tmp_path / "runs" / "r7" / "config.json")
    text = str(caught.value)
    assert text.startswith("trainer stopped: no space left on device writing weights /r/weights/v4"), text
    assert text.endswith("`rlstream up CONFIG --run-id r7` continues the run") and child.restart_at is None
    json.dumps(text)  # one printable line
