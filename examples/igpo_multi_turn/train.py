"""Train the IGPO example: ``python examples/igpo_multi_turn/train.py`` (built-in model, ~30 s on
2 cores); ``--advantage grpo`` trains the same example with plain GRPO, for comparison
(bench/igpo_vs_grpo.py runs both side by side)."""
import argparse
import json
from pathlib import Path

from rollout import make_rollout_fn

from rlstream import Config, main


def write_rows(path: Path) -> Path:
    """The 100 registers' questions as chat rows."""
    rows = [{"messages": [{"role": "user", "content": f"{r:02d}"}]} for r in range(100)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_config(args: argparse.Namespace) -> Config:
    log_path = Path(args.log_path)
    log_path.mkdir(parents=True, exist_ok=True)
    return Config(
        base_model="builtin:tiny",
        dataset=str(write_rows(log_path / "igpo_rows.jsonl")),
        log_path=str(log_path),
        run_id=args.run_id,
        seed=args.seed,
        max_steps=args.max_steps,
        advantage=args.advantage,  # "igpo": turn-level information gain, one advantage per token
        igpo_gamma=args.gamma,
        # the group's mean turn reward subtracted, not divided by the std: in a group whose outcomes all
        # failed, the paper's z-score blows the gains up to unit-variance advantages and pushes every failed
        # answer down by ~1 (README, "Why not the paper's z-score"); the gains at half an outcome's weight
        igpo_normalization=args.normalization,
        igpo_ig_weight=args.ig_weight,
        learning_rate=2e-3,
        lr_schedule="constant",
        completions_per_prompt=8,
        prompt_groups_per_step=args.groups,
        max_completion_tokens=1,  # a turn is one token: a digit (an answer) or "+" (a lookup)
        max_seq_len=16,
        kl_beta=0.0,  # no reference model (the cookbook's default, 0.001, loads one)
        epochs=1000,
        extras={"seed": args.seed},
        workers={"count": args.workers},
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--log-path", default="runs")
    p.add_argument("--run-id", default=None)
    p.add_argument("--advantage", default="igpo", choices=["igpo", "grpo", "dr_grpo"])
    p.add_argument("--gamma", type=float, default=0.99)
    p.add_argument("--normalization", default="mean", choices=["joint", "mean", "separate"])
    p.add_argument("--ig-weight", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    result = main(build_config(p.parse_args()), rollout_fn_factory=make_rollout_fn)
    print(f"done: run {result.run_id}, {result.steps} steps, version {result.version}, in {result.run_dir}")
