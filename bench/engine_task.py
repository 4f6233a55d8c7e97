"""The built-in task through a real vLLM server next to the local backend: the same run
(``builtin:tiny-h64``, the same steps, groups, learning rate and seed) once with each
``inference.backend``, one after the other, and their ratio.

Run (from the repository root, in the project's venv; vLLM runs from its own venv)::

    python bench/engine_task.py                     # 50 steps x 32 groups x 8, ~6 min on 2 cores
    python bench/engine_task.py --steps 30 --python /path/to/venv/bin/python

``--python`` is a Python with vLLM (default: the test suite's cached side venv, as in
bench/engine_sync.py). The vLLM run is started by ``rlstream up`` itself (``launch = true``,
``--enforce-eager --dtype float32``, ``VLLM_CPU_KVCACHE_SPACE=1``, port 18000 and up), one
worker sampling from it; the local run has the same one worker sampling in its own torch model.
Printed per backend: wall time of ``up`` (vLLM's start-up included, and given apart), the
median sampling rate the trainer saw (``perf/rollout_samples_per_s``), the reward of the first
and last 10 steps, and the exact expected reward of v0 and of the last version (the mean
probability of the right digit over the task's 100 problems).
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from engine_sync import SIDE_PYTHON, free_port, require_vllm_python

from rlstream.builtin.task import expected_reward
from rlstream.core.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "builtin" / "config.toml"


def run(backend: str, args: argparse.Namespace, root: Path) -> dict:
    cwd = root / backend
    cwd.mkdir()
    cmd = [sys.executable, "-m", "rlstream.cli", "up", str(CONFIG), "--run-id", backend,
           "--set", 'base_model="builtin:tiny-h64"', "--set", f"max_steps={args.steps}",
           "--set", f"prompt_groups_per_step={args.groups}", "--set", f"completions_per_prompt={args.completions}",
           "--set", f"learning_rate={args.lr}", "--set", 'lr_schedule="constant"', "--set", "workers.count=1",
           "--set", f"keep_weights={args.steps + 1}"]
    for o in args.overrides:
        cmd += ["--set", o]
    if backend == "vllm":
        cmd += ["--set", 'inference.backend="vllm"',
                "--set", f'inference.base_url="http://127.0.0.1:{free_port()}/v1"', "--set", "inference.launch=true",
                "--set", f'inference.engine_python="{args.python}"',
                "--set", 'inference.engine_args=["--enforce-eager", "--dtype", "float32"]',
                "--set", 'inference.engine_env={VLLM_CPU_KVCACHE_SPACE = "1"}']
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=3600,
                          env={**os.environ, "RLSTREAM_LOG_LEVEL": "INFO"})
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{backend} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    run_dir = cwd / "runs" / backend
    rows = read_metrics(run_dir / "metrics.jsonl")
    rewards = [r["rollout/reward_mean"] for r in rows]
    # up's log: "started engine-0 ..." when it starts the server, "vllm up at <url>" once it answers
    startup = None
    if backend == "vllm":
        stamps = [(line, t) for line in proc.stderr.splitlines() if (t := _clock(line)) is not None]
        started = next((t for line, t in stamps if "started engine-0" in line), None)
        up = next((t for line, t in stamps if "vllm up at" in line), None)
        startup = up - started if started is not None and up is not None else None
    return {"wall": wall, "startup": startup, "rate": statistics.median(r["perf/rollout_samples_per_s"] for r in rows),
            "first10": sum(rewards[:10]) / 10, "last10": sum(rewards[-10:]) / 10,
            "v0": expected_reward(run_dir / "weights" / "v0"),
            "vN": expected_reward(run_dir / "weights" / f"v{args.steps}")}


def _clock(line: str) -> float | None:
    m = re.match(r"\d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d{3}) ", line)
    return None if m is None else int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3]) + int(m[4]) / 1000


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", type=Path, default=SIDE_PYTHON, help="a Python with vLLM installed")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--completions", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides (both runs)")
    args = ap.parse_args(argv)
    require_vllm_python(args.python)
    load = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="rlbench-task-"))
    try:
        results = {backend: run(backend, args, root) for backend in ("local", "vllm")}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"engine task benchmark  {time.strftime('%Y-%m-%d')}  {platform.machine()} {os.cpu_count()} cpus  "
          f"load avg {load:.2f} at start")
    print(f"built-in task, builtin:tiny-h64, {args.steps} steps x {args.groups} groups x {args.completions}, "
          f"lr {args.lr:g} constant, 1 worker {' '.join(args.overrides)}")
    print()
    print("| backend | wall s | engine start s | samples/s (median step) | reward first 10 | reward last 10 "
          "| expected reward v0 -> last |")
    print("|---|---|---|---|---|---|---|")
    for backend, r in results.items():
        start = "—" if r["startup"] is None else f"{r['startup']:.0f}"
        print(f"| {backend} | {r['wall']:.0f} | {start} | {r['rate']:.0f} | {r['first10']:.3f} | {r['last10']:.3f} "
              f"| {r['v0']:.3f} -> {r['vN']:.3f} |")
    local, vllm = results["local"], results["vllm"]
    print(f"\nratio vllm / local: wall {vllm['wall'] / local['wall']:.2f}, "
          f"wall without the engine's start {(vllm['wall'] - (vllm['startup'] or 0)) / local['wall']:.2f}, "
          f"samples/s {vllm['rate'] / local['rate']:.2f}")


if __name__ == "__main__":
    main()
