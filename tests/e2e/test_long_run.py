"""Long runs at bounded cost (docs/operations.md "Long runs: retention, recovery, export", docs/design.md §15.45
Archive, then trim): a real ``rlstream up`` run with a short checkpoint interval archives
the rollouts each checkpoint covers and trims them from Redis; its trainer is SIGKILLed in
the middle of an archive write and its redis-server right after a trim (failpoints), and
still ``rlstream audit`` is clean, ``rlstream export`` writes one line per trained sample,
and ``rlstream replay`` of the run's first steps, served from the archive, reproduces their
losses (under ``-m slow``, with the several-hundred-step run that asserts Redis stays flat;
the default suite replays a wholly archived run in test_replay.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fault_harness import assert_audit_clean, assert_steps_exactly, assert_summary, rlstream, running_up
from polling import wait_until

from rlstream.core import keys
from rlstream.core.archive import Archive
from rlstream.core.bus import iter_all_events
from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis, stored_password
from rlstream.core.messages import StepCommitted
from rlstream.core.metrics import read_metrics

pytestmark = pytest.mark.e2e
CONFIG = Path(__file__).resolve().parents[2] / "examples" / "builtin" / "config.toml"
TINY = ["--set", "prompt_groups_per_step=2", "--set", "completions_per_prompt=2", "--set", "workers.count=1",
        "--set", 'lr_schedule="constant"']
HERE = str(Path(__file__).parent)  # bulky_rollout.py, for `up` and its children
ENV = {"PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), HERE) if p)}


def stream_state(run_dir: Path, run_id: str) -> tuple[int, list[StepCommitted], set[str]]:
    """(rollouts stream length, committed steps, ids still in the stream) of a finished run."""
    server = EmbeddedRedis(run_dir / "redis")
    r = connect(server.start())
    try:
        steps = [m for _, m in iter_all_events(r, run_id) if isinstance(m, StepCommitted)]
        in_stream = {e.decode() for e, _ in r.xrange(keys.rollouts(run_id))}
        return r.xlen(keys.rollouts(run_id)), steps, in_stream
    finally:
        r.close()
        server.stop()


def check_archive_audit_export_replay(tmp_path: Path, run_id: str, steps: int, replayed: int) -> None:
    """The finished run: archive whole, audit clean, export complete, replay of its first
    ``replayed`` steps (0: none) from the archive exact."""
    run_dir = tmp_path / "runs" / run_id
    assert_steps_exactly(run_dir, steps)
    archive = Archive(run_dir, run_id)
    assert archive.problems() == [] and len(archive.segments()) >= 2
    assert not list(archive.dir.glob(".*.tmp")), "a temp file of a killed write was left behind"
    audit = assert_audit_clean(run_dir, tmp_path)
    trained = int(next(line for line in audit.splitlines() if line.startswith("samples_trained:")).split()[1])

    length, committed, in_stream = stream_state(run_dir, run_id)
    assert [c.step for c in committed] == list(range(1, steps + 1))
    # After the final checkpoint only undelivered samples are left in Redis; the first steps' are archived only.
    assert length <= 4 * 2 * 2, length
    first = [e for c in committed[:max(replayed, 2)] for e in c.entry_ids]
    assert not in_stream & set(first) and len(archive.fetch(first)) == len(first)

    out = tmp_path / f"{run_id}.jsonl"
    rlstream("export", run_id, "--out", str(out), cwd=tmp_path)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == trained == sum(len(c.entry_ids) for c in committed)
    assert [(x["step"], x["entry_id"]) for x in lines] == [(c.step, e) for c in committed for e in c.entry_ids]
    assert {"tokens", "logprobs", "loss_mask", "reward", "text", "version_offset", "group_id"} <= lines[0].keys()
    if not replayed:
        return

    proc = rlstream("replay", run_id, str(CONFIG), "--run-id", f"{run_id}-replay", *TINY,
                    "--set", f"max_steps={replayed}", cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    source = read_metrics(run_dir / "metrics.jsonl")[:replayed]
    again = read_metrics(tmp_path / "runs" / f"{run_id}-replay" / "metrics.jsonl")
    assert [m["replay/source_step"] for m in again] == list(range(1, replayed + 1))
    for a, b in zip(again, source):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5, abs=1e-7)


def test_archive_survives_kills_then_audit_export_and_replay_from_it(tmp_path: Path) -> None:
    """Trainer SIGKILLed mid archive write at step 6, redis-server SIGKILLed after the trim of step 9."""
    steps = 12
    env = {**ENV, "RLSTREAM_FAULT": "mid_archive:6,after_trim:9"}
    with running_up(tmp_path, "kept", *TINY, "--set", f"max_steps={steps}", "--set", "dcp_save_interval=3",
                    "--set", "job_timeout=20", "--set", 'rollout_fn_factory="bulky_rollout:factory"', env=env) as up:
        code = up.wait_exit(timeout=300)
        assert code == 0, up.logs()
        assert_summary(up, steps)
        logs = up.logs() + "".join(p.read_text(errors="replace") for p in (up.run_dir / "logs").glob("trainer*.log"))
        assert "failpoint mid_archive: SIGKILL" in logs and "failpoint after_trim: SIGKILL redis-server" in logs
        assert "embedded redis-server died; restarting it from its AOF" in up.stderr(), up.logs()
    # The first steps' samples are in the archive only (checked above); a replay of them is in the slow variant,
    # and tests/e2e/test_replay.py replays a finished (so wholly archived) run in the default suite.
    check_archive_audit_export_replay(tmp_path, "kept", steps, replayed=0)


@pytest.mark.slow
def test_several_hundred_steps_keep_redis_flat(tmp_path: Path) -> None:
    """Rollouts stream length and Redis used_memory stay flat once checkpoints trim, over 300
    steps (untrimmed, ~8 KB samples x 4 a step would add ~10 MB)."""
    steps, interval = 300, 10
    seen: list[tuple[int, int, int]] = []  # (step, stream length, used_memory)
    with running_up(tmp_path, "long", *TINY, "--set", f"max_steps={steps}", "--set", f"dcp_save_interval={interval}",
                    "--set", 'rollout_fn_factory="bulky_rollout:factory"', env=ENV) as up:
        up.wait_steps(1, timeout=180)
        r = connect((up.run_dir / "redis" / "url").read_text().strip(), password=stored_password(up.run_dir / "redis"))

        def sample() -> bool:
            if up.proc.poll() is not None:
                return True
            try:
                seen.append((up.steps(), r.xlen(keys.rollouts("long")), int(r.info("memory")["used_memory"])))
            except Exception:  # the server stops as the run ends
                pass
            return False
        wait_until(sample, 600, "the 300-step run to end", interval=0.2)  # > 20 samples even when the run is fast
        r.close()
        assert up.proc.returncode == 0, up.logs()
    late = [s for s in seen if s[0] >= 3 * interval]
    assert len(late) > 20, seen
    bound = (interval + 2 + 2) * 2 * 2  # (interval + staleness window + a batch in flight) batches of samples
    assert max(length for _, length, _ in late) <= bound, late
    early_mem = max(m for s, _, m in late if s < 6 * interval)
    archived = sum(seg.bytes for seg in Archive(up.run_dir, "long").segments())
    assert archived > 5e6  # what an untrimmed stream would have kept
    assert max(m for _, _, m in late) - early_mem < archived / 10, (early_mem, late[-5:], archived)
    check_archive_audit_export_replay(tmp_path, "long", steps, replayed=5)
