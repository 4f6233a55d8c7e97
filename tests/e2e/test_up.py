"""End to end: real ``rlstream up`` processes, a real redis-server, the tiny model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import rlstream
from polling import wait_until
from report_pages import open_report

from rlstream.core import bus, keys
from rlstream.core.archive import Archive, all_rollouts
from rlstream.core.codec import decode
from rlstream.core.connection import connect
from rlstream.core.credentials import without_password
from rlstream.core.messages import RolloutRecord, StepCommitted
from rlstream.core.metrics import read_metrics

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "builtin" / "config.toml"


def test_short_run_on_external_redis_bumps_versions_and_stamps_samples(builtin_run) -> None:
    """A short run against an external Redis (RLSTREAM_REDIS_URL; the session's shared run,
    tests/e2e/conftest.py): no embedded server is started, versions bump once per step and
    every trained sample is stamped correctly."""
    proc, run_dir, run_id = builtin_run.up, builtin_run.run_dir, builtin_run.run_id
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("summary: steps=5 final_version=5"), last_line

    assert not (run_dir / "redis").exists(), "an embedded redis-server was started despite RLSTREAM_REDIS_URL"
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["version"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("rollout/reward_mean", "rollout/samples", "async/version_offset_max", "async/version_offset_mean",
                "train/loss", "perf/step_time", "perf/train_wait_time"):
        assert all(key in r for r in rows), key
    resolved = json.loads((run_dir / "config.json").read_text())
    assert resolved["run_id"] == run_id
    assert resolved["redis"]["url"] == without_password(builtin_run.url)  # the password is not written
    assert (run_dir / "weights" / "v5" / "manifest.json").is_file()

    # Audit what the trainer consumed, on the external server the run used.
    r = connect(builtin_run.url)
    try:
        committed = [m for _, m in bus.iter_all_events(r, run_id) if isinstance(m, StepCommitted)]
        assert [c.step for c in committed] == [1, 2, 3, 4, 5]
        # Every rollout the run had: the archive (the final checkpoint moved the trained ones out of Redis;
        # docs/design.md §15.45 Archive, then trim), then the stream.
        everything = list(all_rollouts(r, Archive(run_dir, run_id)))
        assert len(everything) >= 5 * 32
        by_id = {entry_id: decode(raw) for entry_id, raw in everything}
        versions_seen = set()
        for c in committed:
            assert len(c.entry_ids) == 32
            for entry_id in c.entry_ids:
                sample = by_id[entry_id]
                assert isinstance(sample, RolloutRecord)
                # sampled with a published version no newer than the weights it trained
                assert 0 <= sample.min_version <= sample.max_version <= c.version - 1
                assert c.version - 1 - sample.submit_version <= 2  # O + 1 with O = 1
                versions_seen.add(sample.min_version)
        assert max(versions_seen) >= 1, "no sample was generated with updated weights"
        assert bus.group_info(r, keys.rollouts(run_id))["pending"] == 0
    finally:
        r.close()


def test_status_and_report_of_a_finished_run(builtin_run, tmp_path: Path) -> None:
    """``rlstream status`` (text and --json) and ``rlstream report`` on the session's shared run,
    on the external Redis it ran on; the perf and rollout metric families it logged."""
    run_dir = builtin_run.run_dir
    status = rlstream("status", str(run_dir), cwd=tmp_path, timeout=60, env=builtin_run.env)
    assert status.returncode == 0, status.stderr
    assert "published_version" in status.stdout and "finished" in status.stdout
    assert not (run_dir / "redis").exists(), "status started an embedded redis-server for an external-Redis run"

    # The perf and rollout families, status --json and the report, on this real run.
    rows = read_metrics(run_dir / "metrics.jsonl")
    for key in ("perf/trainer_wait_for_sampler_time", "perf/sampler_wait_for_trainer_time", "perf/overlap_ratio",
                "perf/step_wall_time", "perf/rollout_samples_per_s", "perf/rollout_tokens_per_s",
                "perf/weight_sync_time", "rollout/accuracy", "rollout/truncated_ratio", "rollout/response_len/mean",
                "rollout/entropy", "async/stale_groups_dropped"):
        assert all(key in r for r in rows), key
    assert sum(r["perf/rollout_samples_per_s"] for r in rows) > 0
    status = rlstream("status", str(run_dir), "--json", cwd=tmp_path, timeout=60, env=builtin_run.env)
    assert status.returncode == 0, status.stderr
    out = json.loads(status.stdout)
    assert out["steps"] == 5 and out["rates"]["steps_per_s"] > 0 and out["rates"]["samples_per_s"] > 0
    report = rlstream("report", str(run_dir), cwd=tmp_path, timeout=120)  # RUN/report.html
    assert report.returncode == 0, report.stderr
    headings, images, missing = open_report(run_dir / "report.html")
    assert missing == ["Evaluation"] and len(images) == len(headings) - 1  # the built-in run has no evaluation_fn


def test_builtin_task_learns(tmp_path: Path) -> None:
    """The acceptance run of the README's first command: reward <= 0.3 -> >= 0.8 in 5 min."""
    start = time.monotonic()
    proc = rlstream("up", str(CONFIG), "--run-id", "learn", cwd=tmp_path, timeout=330)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "learn"
    rows = read_metrics(run_dir / "metrics.jsonl")
    rewards = [r["rollout/reward_mean"] for r in rows]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert first <= 0.3 and last >= 0.8, (first, last, wall)
    # O = 1: the gate bounds submit offsets by O + 1, and sampling really overlaps training
    # (some samples were drawn with weights older than the ones that trained them).
    assert max(r["async/submit_offset_max"] for r in rows) <= 2
    assert max(r["async/version_offset_max"] for r in rows) <= 2
    assert any(r["async/version_offset_max"] >= 1 for r in rows)
    # The embedded Redis kept its AOF under the run directory and was stopped at the end.
    assert (run_dir / "redis" / "appendonly.aof").exists() or (run_dir / "redis" / "appendonlydir").exists()
    assert not (run_dir / "redis" / "url").exists()


def test_sigterm_to_up_stops_every_child_and_redis(tmp_path: Path) -> None:
    """`kill <up>` must not orphan children (they run in their own sessions) or redis."""
    proc = subprocess.Popen([sys.executable, "-m", "rlstream.cli", "up", str(CONFIG), "--run-id", "term",
                             "--set", "max_steps=1000", "--set", "prompt_groups_per_step=4",
                             "--set", "completions_per_prompt=4"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "runs" / "term"

    def stepped() -> bool:
        assert proc.poll() is None, proc.stderr.read()
        return (run_dir / "metrics.jsonl").is_file() and bool((run_dir / "metrics.jsonl").read_text().strip())

    wait_until(stepped, 120, "the first step", interval=0.2)
    redis_pid = int((run_dir / "redis" / "pid").read_text())
    proc.terminate()
    assert proc.wait(60) == 130
    leftovers = subprocess.run(["pgrep", "-f", "runs/term/config.json"], capture_output=True, text=True).stdout.split()
    mine = [p for p in leftovers if Path(f"/proc/{p}/cwd").exists() and Path(os.readlink(f"/proc/{p}/cwd")) == tmp_path]
    assert mine == [], mine
    assert not Path(f"/proc/{redis_pid}").exists() or "Z" in Path(f"/proc/{redis_pid}/stat").read_text().split()[2]


def test_unreachable_external_redis_fails_fast(tmp_path: Path) -> None:
    proc = rlstream("up", str(CONFIG), "--set", "redis.url=\"redis://127.0.0.1:1/0\"", "--set",
                    "redis.connect_timeout=2", cwd=tmp_path, timeout=60)
    assert proc.returncode != 0
    assert "cannot reach Redis at redis://127.0.0.1:1/0" in proc.stderr


def test_sigkill_to_up_leaves_no_child_or_redis_running(tmp_path: Path) -> None:
    """A SIGKILLed `up` runs no `finally`: its children (own sessions) and redis-server
    must still go, by themselves (prctl PDEATHSIG, and the children's watch of up's pid)."""
    from fault_harness import running_up
    from polling import wait_until

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
        except OSError:
            return True

    with running_up(tmp_path, "orphans", "--set", "max_steps=1000", "--set", "prompt_groups_per_step=4",
                    "--set", "completions_per_prompt=4", "--set", "workers.count=2") as up:
        up.wait_steps(1, timeout=120)
        pids = {role: up.child_pids(role) for role in ("trainer", "producer", "worker")}
        pids["redis-server"] = [up.redis_pid()]
        assert all(pids.values()) and len(pids["worker"]) == 2, (pids, up.logs())
        up.proc.kill()
        up.proc.wait(10)
        everyone = [pid for group in pids.values() for pid in group]
        try:
            wait_until(lambda: all(gone(p) for p in everyone), 30, "every child of the killed up to exit")
        except AssertionError as exc:
            survivors = [(role, p) for role, group in pids.items() for p in group if not gone(p)]
            raise AssertionError(f"{exc}: still running {survivors}") from None
