"""The weights' files written by a process of their own (``trainer.weight_writer = "process"``;
docs/design.md §15.99 The weights are written by a process of their own; trainer/weight_writer.py),
on fakeredis with the built-in tiny model: each version is the very directory ``save_pretrained``
writes (float32, stored as bfloat16, LoRA merged) from the shared tensors every snapshot is
copied into, announced in order and pruned; an error in the child, or its death, stops the
trainer at its next step with why; the child dies with the trainer, outlives a Ctrl-C, and is
ended when it does not start in time; without room in shared memory the writer's thread writes
the files."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from polling import wait_until
from test_weight_sync import RUN, bfloat16_base, published, ready_trainer, step

from rlstream.core import bus, weights
from rlstream.core.disk import DiskFull
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import WeightsPublished
from rlstream.trainer import weight_sync, weight_writer
from rlstream.trainer.policy_model import weights_dir, write_model_dir
from rlstream.trainer.trainer import Trainer
from rlstream.trainer.weight_writer import WriterProcess

pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group


def process_trainer(r, tmp_path, groups: int, **over) -> Trainer:
    """A trainer whose weights are written by the writer process, after resume (v0: the template)."""
    return ready_trainer(r, tmp_path, groups, trainer={"weight_writer": "process"}, **over)


@pytest.mark.parametrize("variant", ["float32", "stored in bfloat16", "lora"])
def test_each_version_the_process_writes_is_the_directory_save_pretrained_writes(r, tmp_path, variant):
    over = {"float32": {}, "stored in bfloat16": bfloat16_base(tmp_path), "lora": {"lora_rank": 4}}[variant]
    t = process_trainer(r, tmp_path, groups=3, **over)
    try:
        for version in (1, 2, 3):  # the first starts the process; the others reuse its shared tensors
            step(t)
            with t.precision.published():
                expected = write_model_dir(tmp_path / f"by-save-pretrained-{version}", t.model, t.tokenizer,
                                           version=version)
            t.weight_sync.wait()
            assert t.weight_sync.writer is not None and t.weight_sync.writer.process.is_alive()
            assert weights.directory_digest(weights_dir(t.run_dir, version))[:2] == expected
        assert published(r) == [0, 1, 2, 3]
        assert sorted(p.name for p in (t.run_dir / "weights").iterdir()) == ["v0", "v2", "v3"]  # keep 2, and v0
        assert not any(p.is_shared() for p in t.model.parameters())  # the copies are shared, never the model
    finally:
        writer = t.weight_sync.writer
        t.weight_sync.close()
    assert writer is not None and writer.process.exitcode == 0  # ended at the pipe's end


def test_an_error_in_the_writer_process_stops_the_trainer_at_its_next_step(r, tmp_path):
    t = process_trainer(r, tmp_path, groups=2)
    # v1's temporary directory cannot be made: a file is in its place
    weights.tmp_dir(weights_dir(t.run_dir, 1)).write_text("in the way")
    step(t)  # committed; v1's write fails in the child
    with pytest.raises(FileExistsError):
        step(t)  # raised, as the child raised it, before step 2 commits anything
    assert published(r) == [0]
    t.weight_sync.close()


def test_a_killed_writer_process_stops_the_trainer_with_why(r, tmp_path):
    t = process_trainer(r, tmp_path, groups=3)
    step(t)
    t.weight_sync.wait()
    os.kill(t.weight_sync.writer.process.pid, signal.SIGKILL)
    step(t)  # committed; v2 is handed to a dead writer
    with pytest.raises(RlstreamError, match=r"the weight writer process \(pid \d+\) exited with code -9"):
        step(t)
    assert published(r) == [0, 1]
    t.weight_sync.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_the_writer_process_dies_with_the_trainer(tmp_path):
    script = ("import time\nfrom rlstream.trainer.weight_writer import WriterProcess\n"
              "w = WriterProcess(None, {})\nprint(w.process.pid, flush=True)\ntime.sleep(120)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(trainer.stdout.readline())
        assert alive(child)
        trainer.kill()  # SIGKILL: no atexit, no pipe closed by hand
        trainer.wait(10)
        wait_until(lambda: not alive(child), 30, "the writer process to die with its trainer", interval=0.05)
    finally:
        trainer.kill()


def alive(pid: int) -> bool:
    """Running (a zombie, which only waits for a parent to reap it, is not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_without_room_in_shared_memory_the_writers_thread_writes_the_files(r, tmp_path, monkeypatch):
    def no_room(nbytes, where="/dev/shm"):
        raise RlstreamError(f"{where} has 0 MiB free")

    monkeypatch.setattr(weight_writer, "shared_memory_room", no_room)
    t = process_trainer(r, tmp_path, groups=2)
    for _ in range(2):
        step(t)
    t.weight_sync.wait()
    assert t.weight_sync.writer is None and not t.weight_sync.use_process
    assert published(r) == [0, 1, 2]
    last = [m for _, m in bus.iter_all_events(r, RUN) if isinstance(m, WeightsPublished)][-1]
    weights.verify(weights_dir(t.run_dir, 2), last.sha256)
    t.weight_sync.close()


def test_shared_memory_room_refuses_a_snapshot_larger_than_what_is_free(tmp_path):
    weight_writer.shared_memory_room(1 << 20, str(tmp_path))  # room
    with pytest.raises(RlstreamError, match="docker --shm-size"):
        weight_writer.shared_memory_room(1 << 62, str(tmp_path))


def test_the_child_sends_its_own_and_the_oss_errors_as_they_are_and_any_other_by_name():
    full = weight_writer.as_sent(DiskFull("no space left"))
    assert type(full) is DiskFull and full.exit_code == DiskFull.exit_code
    assert type(weight_writer.as_sent(FileExistsError(17, "exists"))) is FileExistsError
    other = weight_writer.as_sent(KeyError("key"))
    assert type(other) is RlstreamError and "KeyError" in str(other)


def test_the_writer_process_does_not_run_the_trainers_script_again(tmp_path):
    # A script that starts a run at its top level, without a main guard: a spawned child would run it again.
    script = tmp_path / "train.py"
    script.write_text("import os\nprint('top level', os.getpid(), flush=True)\n"
                      "from rlstream.trainer.weight_writer import WriterProcess\n"
                      "if os.environ.get('RLSTREAM_TEST_STARTED') is None:\n"
                      "    os.environ['RLSTREAM_TEST_STARTED'] = '1'\n"
                      "    WriterProcess(None, {}).close()\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("top level") == 1, out.stdout


def test_a_ctrl_c_leaves_the_writer_process_to_finish_the_version_in_flight(tmp_path):
    # Ctrl-C in a terminal reaches the whole foreground process group, the writer too: the trainer's
    # KeyboardInterrupt finishes the version in flight (WeightSync.close), which its writer must still write
    writer = WriterProcess(None, {})
    try:
        os.kill(writer.process.pid, signal.SIGINT)
        (tmp_path / "weights" / "v1").mkdir(parents=True)
        writer.prune(tmp_path, 3, 2)
        assert not (tmp_path / "weights" / "v1").exists()
    finally:
        writer.close()
    assert writer.process.exitcode == 0  # ended at the pipe's end, not by the KeyboardInterrupt


class Unready:
    """Unpickled by the writer process before it can answer 'ready': it sleeps a minute first."""

    def __reduce__(self):
        return time.sleep, (60,)


def test_a_writer_process_that_did_not_start_in_time_is_ended(monkeypatch):
    # the writer's thread writes the files then (WeightSync.start_writer): a child that answers later must not
    # run beside it for the rest of the run, mapping the shared copy of the weights
    monkeypatch.setattr(weight_writer, "START_BOUND_S", 1.0)
    with pytest.raises(RlstreamError, match=r"the weight writer process \(pid (\d+)\) did not answer") as raised:
        WriterProcess(Unready(), {})
    assert not alive(int(re.search(r"pid (\d+)", str(raised.value)).group(1)))
    assert "the trainer stops" not in str(raised.value)  # it does not: start_writer falls back to the thread


def test_a_hung_writer_process_is_ended_when_the_step_gives_up_on_it(r, tmp_path, monkeypatch):
    t = process_trainer(r, tmp_path, groups=3)
    step(t)
    t.weight_sync.wait()
    child = t.weight_sync.writer.process
    os.kill(child.pid, signal.SIGSTOP)  # alive, never answering: a write hung on a dead disk
    try:
        step(t)  # committed; v2 is handed to the stopped child
        monkeypatch.setattr(weight_sync, "WRITE_BOUND_S", 1.0)
        with pytest.raises(RlstreamError, match="did not finish within 1s"):
            step(t)
        # ended with the bound, so the writer's thread, which waited on it, is free and close() does not wait
        # WRITE_BOUND_S for it (before, the child was left stopped and close() joined the thread that long)
        wait_until(lambda: not alive(child.pid), 30, "the hung writer process to be ended", interval=0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGCONT)
    t.weight_sync.close()
