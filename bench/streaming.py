"""What streaming accumulation (``trainer.streaming``) saves on the built-in task.

    python bench/streaming.py                      # 100 steps, O = 0 and O = 1, 3 rounds
    python bench/streaming.py --steps 60 --rounds 2 --offpolicy 0

Each variant is a whole ``rlstream up examples/builtin/config.toml`` run (embedded Redis, two
workers, the trainer) with ``trainer.micro_batch_tokens`` set, streaming off and on, variants
interleaved round by round so that load on the machine hits them alike. Reported per variant
(medians over rounds): the run's wall time, the trainer's mean wait for its batch
(``perf/trainer_wait_for_sampler_time``), its mean step time after the batch was complete
(``perf/train_time``), the share of samples that ran before the batch was complete
(``perf/streamed_share``), and the final reward; then the ratio of wall times off/on. Not a
test: timings are never asserted (docs/design.md §13 Tests).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(steps: int, offpolicy: int, streaming: bool, budget: int, log_path: str) -> dict:
    run_id = f"bench-{'on' if streaming else 'off'}-o{offpolicy}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "rlstream.cli", "up", str(ROOT / "examples/builtin/config.toml"), "--run-id", run_id,
           "--set", f"log_path={json.dumps(log_path)}", "--set", f"max_steps={steps}",
           "--set", f"max_head_offpolicy_versions={offpolicy}", "--set", f"trainer.micro_batch_tokens={budget}",
           "--set", f"trainer.streaming={'true' if streaming else 'false'}", "--set", "lr_schedule=\"constant\""]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    wall = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"run failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-3000:]}")
    lines = [json.loads(x) for x in (Path(log_path) / run_id / "metrics.jsonl").read_text().splitlines() if x]
    steps_m = [m for m in lines if "perf/train_time" in m]
    summary = re.search(r"wall=([\d.]+)s", out.stdout + out.stderr)
    return {
        "wall": float(summary.group(1)) if summary else wall,
        "wait": statistics.mean(m["perf/trainer_wait_for_sampler_time"] for m in steps_m),
        "step": statistics.mean(m["perf/train_time"] for m in steps_m),
        "streamed": statistics.mean(m.get("perf/streamed_share", 0.0) for m in steps_m),
        "reward": statistics.mean(m["rollout/reward_mean"] for m in steps_m[-10:]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--offpolicy", type=int, nargs="+", default=[0, 1], help="max_head_offpolicy_versions values")
    ap.add_argument("--budget", type=int, default=64, help="trainer.micro_batch_tokens (built-in rows are <= 8 tokens)")
    args = ap.parse_args()
    print(f"streaming benchmark  {date.today()}  {platform.machine()} {os.cpu_count()} cpus  "
          f"load avg {os.getloadavg()[0]:.2f} at start")
    print(f"built-in task, {args.steps} steps of 32 x 8, micro_batch_tokens={args.budget}, {args.rounds} rounds, "
          "variants interleaved")
    results: dict[tuple[int, bool], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for o in args.offpolicy:
                for streaming in (False, True):
                    results.setdefault((o, streaming), []).append(run(args.steps, o, streaming, args.budget, tmp))
    print("\n| O | streaming | wall (s) | trainer wait/step (s) | step after batch (s) | streamed share "
          "| reward last 10 |")
    print("|---|---|---|---|---|---|---|")
    for (o, streaming), rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"| {o} | {'on' if streaming else 'off'} | {med['wall']:.1f} | {med['wait']:.3f} | {med['step']:.3f} | "
              f"{med['streamed']:.0%} | {med['reward']:.3f} |")
    for o in args.offpolicy:
        ratio = [off["wall"] / on["wall"] for off, on in zip(results[(o, False)], results[(o, True)])]
        print(f"O={o}: wall off/on = {statistics.median(ratio):.2f} (per round {min(ratio):.2f}-{max(ratio):.2f})")


if __name__ == "__main__":
    main()
