"""Every policy loss through the real pipeline on the built-in task, for a fixed budget.

    python bench/losses.py                      # 7 losses x 150 steps, ~12 min on 2 cores
    python bench/losses.py --steps 300 --losses grpo dapo

Each loss runs ``rlstream up examples/builtin/config.toml`` (2 workers, O = 1, linear LR decay
over the budget) with ``policy_loss`` set, then the table reports the mean
``rollout/reward_mean`` of the first and last 10 steps, the gain, whether the gain meets the
acceptance bar (last-10 mean - first-10 mean >= 0.3, ``--min-gain``) and the wall time. The exit
status is 1 when any loss misses the bar. The loss table in docs/benchmarks.md is this script's output.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlstream.core.config import POLICY_LOSSES

REPO = Path(__file__).resolve().parents[1]
ACCEPTANCE_GAIN = 0.3  # issue 4: each loss raises the reward by >= 0.3 (last 10 vs first 10 steps)
WINDOW = 10


def step_rewards(lines: list[str]) -> list[float]:
    """``rollout/reward_mean`` of each training step; evaluation lines (``eval/version``) and
    any other line without a rollout reward are skipped, not counted as steps."""
    rows = (json.loads(line) for line in lines if line.strip())
    return [row["rollout/reward_mean"] for row in rows if "rollout/reward_mean" in row]


def reward_gain(rewards: list[float], window: int = WINDOW) -> tuple[float, float]:
    """(mean of the first ``window`` rewards, mean of the last ``window``): a short run
    averages what it has instead of dividing by ``window``."""
    if not rewards:
        raise ValueError("no training step recorded a rollout/reward_mean")
    first, last = rewards[:window], rewards[-window:]
    return sum(first) / len(first), sum(last) / len(last)


def run_one(loss: str, steps: int, workdir: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "rlstream.cli", "up", str(REPO / "examples/builtin/config.toml"),
           "--run-id", f"loss-{loss}", "--set", f"policy_loss=\"{loss}\"", "--set", f"max_steps={steps}", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{loss}: rlstream up failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rewards = step_rewards((workdir / "runs" / f"loss-{loss}" / "metrics.jsonl").read_text().splitlines())
    first10, last10 = reward_gain(rewards)
    return {"loss": loss, "steps": len(rewards), "first10": first10, "last10": last10, "wall_s": wall}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--losses", nargs="+", default=list(POLICY_LOSSES), choices=POLICY_LOSSES)
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    p.add_argument("--min-gain", type=float, default=ACCEPTANCE_GAIN,
                   help="acceptance: last-10 mean - first-10 mean must reach this (default %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra = [x for kv in args.extra for x in ("--set", kv)]
    print(f"built-in task, {args.steps} steps, 32 prompts x 8 completions, 2 workers, O=1; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    print(f"| loss | steps | reward first 10 | reward last 10 | gain | gain >= {args.min_gain} | wall (s) |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    missed = []
    with tempfile.TemporaryDirectory() as tmp:
        for loss in args.losses:
            r = run_one(loss, args.steps, Path(tmp), extra)
            gain = r["last10"] - r["first10"]
            if gain < args.min_gain:
                missed.append(loss)
            print(f"| {r['loss']} | {r['steps']} | {r['first10']:.3f} | {r['last10']:.3f} | {gain:+.3f} | "
                  f"{'yes' if gain >= args.min_gain else 'NO'} | {r['wall_s']:.0f} |", flush=True)
    if missed:
        print(f"below the acceptance gain {args.min_gain}: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
