"""IGPO against plain GRPO on the same multi-turn example (examples/igpo_multi_turn/), side by side.

    python bench/igpo_vs_grpo.py                       # 3 rounds x (igpo, grpo), 150 steps each, ~6 min
    python bench/igpo_vs_grpo.py --rounds 1 --steps 40
    python bench/igpo_vs_grpo.py --normalization joint --ig-weight 1   # the paper's z-score

Each round runs the example's train.py twice with the same seed (the same rows, the same
registers' digits drawn in the same order, the same initial weights), once with
``advantage = "igpo"`` and once with ``"grpo"``, alternating which goes first, so load on the
machine hits both alike. The table gives, per run, the mean ``rollout/reward_mean`` of the first
and last 10 steps, the mean over all steps (the area under the learning curve: "how fast"), and
the first step whose 10-step mean reaches 0.3; then the means over rounds. IGPO runs with the
example's settings (``igpo_normalization = "mean"``, ``igpo_ig_weight = 0.5``) unless
``--normalization`` / ``--ig-weight`` say otherwise; GRPO with its defaults. The runs sample
asynchronously, so two runs of one variant differ: read a difference against the spread between
rounds.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "igpo_multi_turn"
WINDOW = 10
LEVEL = 0.3


def run_one(advantage: str, seed: int, steps: int, groups: int, workdir: Path, igpo_args: list[str]) -> dict:
    run_id = f"{advantage}-s{seed}"
    cmd = [sys.executable, "train.py", "--log-path", str(workdir), "--run-id", run_id, "--advantage", advantage,
           "--seed", str(seed), "--max-steps", str(steps), "--groups", str(groups)]
    cmd += igpo_args if advantage == "igpo" else []
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=EXAMPLE, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{advantage} seed {seed}: train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / run_id / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rewards = [r["rollout/reward_mean"] for r in rows if "rollout/reward_mean" in r]
    windows = [statistics.fmean(rewards[max(0, i - WINDOW + 1):i + 1]) for i in range(len(rewards))]
    reached = next((i + 1 for i, w in enumerate(windows) if i + 1 >= WINDOW and w >= LEVEL), None)
    return {"advantage": advantage, "seed": seed, "steps": len(rewards), "first10": statistics.fmean(rewards[:WINDOW]),
            "last10": statistics.fmean(rewards[-WINDOW:]), "mean": statistics.fmean(rewards), "reached": reached,
            "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--normalization", default="mean", choices=["joint", "mean", "separate"],
                   help="igpo_normalization of the IGPO runs (the example's: mean)")
    p.add_argument("--ig-weight", type=float, default=0.5, help="igpo_ig_weight of the IGPO runs (the example's: 0.5)")
    args = p.parse_args(argv)
    igpo_args = ["--normalization", args.normalization, "--ig-weight", str(args.ig_weight)]
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.node()}, {platform.machine()}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f}, Python {platform.python_version()}", flush=True)
    print(f"examples/igpo_multi_turn, {args.steps} steps x {args.groups} groups x 8, 1 worker, {args.rounds} round(s) "
          f"alternating igpo (normalization {args.normalization}, ig_weight {args.ig_weight}) and grpo "
          "(seed = round)", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="igpo_bench_") as tmp:
        for seed in range(args.rounds):
            order = ("igpo", "grpo") if seed % 2 == 0 else ("grpo", "igpo")
            for advantage in order:
                results.append(run_one(advantage, seed, args.steps, args.groups, Path(tmp), igpo_args))
                r = results[-1]
                print(f"  {advantage} seed {seed}: first10 {r['first10']:.3f} last10 {r['last10']:.3f} "
                      f"mean {r['mean']:.3f} reached {r['reached']} ({r['wall_s']:.0f} s)", flush=True)
    print()
    print(f"| advantage | seed | reward, first 10 steps | reward, last 10 steps | mean reward, all steps | "
          f"first step with 10-step mean >= {LEVEL} | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["advantage"] != "igpo", r["seed"])):
        print(f"| {r['advantage']} | {r['seed']} | {r['first10']:.3f} | {r['last10']:.3f} | {r['mean']:.3f} | "
              f"{r['reached'] if r['reached'] is not None else 'not reached'} | {r['wall_s']:.0f} |")
    for advantage in ("igpo", "grpo"):
        mine = [r for r in results if r["advantage"] == advantage]
        reached = [r["reached"] for r in mine if r["reached"] is not None]
        print(f"| {advantage}, mean of {len(mine)} | | {statistics.fmean(r['first10'] for r in mine):.3f} | "
              f"{statistics.fmean(r['last10'] for r in mine):.3f} | {statistics.fmean(r['mean'] for r in mine):.3f} | "
              f"{statistics.fmean(reached) if len(reached) == len(mine) else f'{len(reached)} of {len(mine)}'} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
