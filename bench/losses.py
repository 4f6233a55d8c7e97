"""Every policy loss through the real pipeline on the built-in task, for a fixed budget.

    python bench/losses.py                      # 7 losses x 150 steps, ~12 min on 2 cores
    python bench/losses.py --steps 300 --losses grpo dapo

Each loss runs ``rlstream up examples/builtin/config.toml`` (2 workers, O = 1, linear LR decay
over the budget) with ``policy_loss`` set, then the table reports the mean
``rollout/reward_mean`` of the first and last 10 steps and the wall time. The README's loss
table is this script's output.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOSSES = ("grpo", "importance_sampling", "reinforce", "dapo", "dro", "gspo", "cispo")


def run_one(loss: str, steps: int, workdir: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "rlstream.cli", "up", str(REPO / "examples/builtin/config.toml"),
           "--run-id", f"loss-{loss}", "--set", f"policy_loss=\"{loss}\"", "--set", f"max_steps={steps}", *extra]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{loss}: rlstream up failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (workdir / "runs" / f"loss-{loss}" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["rollout/reward_mean"] for r in rows]
    return {"loss": loss, "steps": len(rows), "first10": sum(rewards[:10]) / 10, "last10": sum(rewards[-10:]) / 10,
            "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    p.add_argument("--set", dest="extra", action="append", default=[], help="extra config override")
    args = p.parse_args()
    extra = [x for kv in args.extra for x in ("--set", kv)]
    print(f"built-in task, {args.steps} steps, 32 prompts x 8 completions, 2 workers, O=1; "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    print("| loss | steps | reward first 10 | reward last 10 | gain | wall (s) |\n|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for loss in args.losses:
            r = run_one(loss, args.steps, Path(tmp), extra)
            print(f"| {r['loss']} | {r['steps']} | {r['first10']:.3f} | {r['last10']:.3f} | "
                  f"{r['last10'] - r['first10']:+.3f} | {r['wall_s']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
