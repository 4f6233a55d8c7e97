"""Long runs at bounded cost: Redis memory, archive size and trainer resume time as a run grows.

    python bench/long_run.py                     # built-in task, 4 groups x 4 a step, 100 then 1000 steps
    python bench/long_run.py --steps 100 1000 --groups 4 --completions 4 --interval 50

Runs ``rlstream up`` on the built-in task (examples/builtin/config.toml) to the first step
count, then continues the same run (``up --run-id``) to each next one, sampling the rollouts
stream's length and Redis's ``used_memory`` every 0.5 s. At each step count it starts the
finished run's Redis from its AOF and times ``Trainer.resume()`` (what a restarted trainer does
before its next step; building the model is not included) twice, interleaved ``--rounds``
times: from the newest checkpoint's fold snapshot (the default, docs/design.md §15.47 Processes
start from the checkpoint's fold), and folding the events stream from its first entry (the
snapshot ignored: what every restart did before). It reports Redis memory and stream length at
each count, the archive's size per 1,000 steps, and both resume times; the resume time from the
snapshot must not grow with the step. Not a test: timings are never asserted (docs/design.md
§13 Tests).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "builtin" / "config.toml"
RUN = "longbench"


def run_up(cwd: Path, steps: int, args: argparse.Namespace) -> list[tuple[int, int, int]]:
    """Run (or continue) the run to ``steps``; return (step, stream length, used_memory) samples."""
    from rlstream.core import keys
    from rlstream.core.connection import connect
    from rlstream.core.embedded_redis import stored_password

    cmd = [sys.executable, "-m", "rlstream.cli", "up", str(CONFIG), "--run-id", RUN, "--set", f"max_steps={steps}",
           "--set", f"prompt_groups_per_step={args.groups}", "--set", f"completions_per_prompt={args.completions}",
           "--set", f"dcp_save_interval={args.interval}", "--set", "workers.count=1"]
    run_dir = cwd / "runs" / RUN
    seen: list[tuple[int, int, int]] = []
    with open(cwd / "up.log", "ab") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=log)
        r = None
        while proc.poll() is None:
            time.sleep(0.5)
            try:
                if r is None and (run_dir / "redis" / "url").is_file():
                    r = connect((run_dir / "redis" / "url").read_text().strip(), timeout=2.0,
                                password=stored_password(run_dir / "redis"))
                if r is not None:
                    lines = (run_dir / "metrics.jsonl").read_text().count("\n")
                    seen.append((lines, r.xlen(keys.rollouts(RUN)), int(r.info("memory")["used_memory"])))
            except Exception:  # starting, restarting or stopping: try again
                r = None
    if proc.returncode != 0:
        raise SystemExit(f"rlstream up failed ({proc.returncode}); see {cwd / 'up.log'}")
    return seen


def resume_times(cwd: Path, rounds: int) -> tuple[list[float], list[float], int]:
    """(resume seconds from the snapshot, resume seconds from the first event, steps)."""
    from rlstream.core.config import validate_config
    from rlstream.core.connection import connect
    from rlstream.core.embedded_redis import EmbeddedRedis
    from rlstream.trainer import trainer as trainer_module

    run_dir = cwd / "runs" / RUN
    cfg = validate_config(json.loads((run_dir / "config.json").read_text()))
    server = EmbeddedRedis(run_dir / "redis")
    r = connect(server.start())
    real = trainer_module.snapshot_checkpoint
    fast, slow, steps = [], [], 0
    try:
        for _ in range(rounds):
            for use_snapshot, out in ((True, fast), (False, slow)):
                trainer_module.snapshot_checkpoint = real if use_snapshot else (lambda *a: None)
                t = trainer_module.Trainer(cfg, r, run_dir)
                t0 = time.perf_counter()
                t.resume()
                out.append(time.perf_counter() - t0)
                steps = t.step
                t.lease.release()
    finally:
        trainer_module.snapshot_checkpoint = real
        r.close()
        server.stop()
    return fast, slow, steps


def archive_bytes(cwd: Path) -> int:
    manifest = cwd / "runs" / RUN / "archive" / "manifest.json"
    return sum(s["bytes"] for s in json.loads(manifest.read_text())["segments"]) if manifest.is_file() else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--groups", type=int, default=4, help="prompt_groups_per_step")
    p.add_argument("--completions", type=int, default=4, help="completions_per_prompt")
    p.add_argument("--interval", type=int, default=50, help="dcp_save_interval")
    p.add_argument("--rounds", type=int, default=3, help="resume timings per variant at each step count")
    args = p.parse_args()
    print(f"# {date.today()} python {platform.python_version()} cpus {os.cpu_count()} load {os.getloadavg()[0]:.2f}; "
          f"built-in task, {args.groups} x {args.completions} samples a step, dcp_save_interval {args.interval}")
    print("| steps | rollouts stream length | Redis used_memory (MB) | archive (MB) | archive per 1,000 steps (MB) "
          "| resume from the checkpoint's fold (s) | resume folding every event (s) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="rlstream-longrun-") as tmp:
        cwd = Path(tmp)
        for steps in args.steps:
            seen = run_up(cwd, steps, args)
            last = [s for s in seen if s[0] >= steps - args.interval] or seen[-1:]
            fast, slow, reached = resume_times(cwd, args.rounds)
            size = archive_bytes(cwd)
            print(f"| {reached} | max {max(s[1] for s in last)} | max {max(s[2] for s in last) / 1e6:.2f} "
                  f"| {size / 1e6:.2f} | {size / 1e6 * 1000 / reached:.2f} | {statistics.median(fast):.3f} "
                  f"| {statistics.median(slow):.3f} |", flush=True)


if __name__ == "__main__":
    main()
