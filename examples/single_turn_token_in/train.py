"""Train the single-turn token-in example: ``python examples/single_turn_token_in/train.py``.

    --base-model /path/to/hf-model   a real local model (its tokenizer must encode data.jsonl's
                                     ids: regenerate data.jsonl with make_data.py --tokenizer ...)
"""
import argparse
from pathlib import Path

from rollout import drop_zero_variance, evaluate, make_rollout_fn

from rlstream import Config, main

HERE = Path(__file__).resolve().parent


def build_config(args: argparse.Namespace) -> Config:
    return Config(
        base_model=args.base_model,
        dataset=str(HERE / "data.jsonl"),
        log_path=args.log_path,
        run_id=args.run_id,
        max_steps=args.max_steps,
        learning_rate=2e-3,
        lr_schedule="linear",
        completions_per_prompt=8,
        prompt_groups_per_step=args.groups,
        max_completion_tokens=1,
        max_seq_len=16,
        kl_beta=0.0,  # no reference model (the cookbook's default, 0.001, loads one)
        epochs=100,
        max_head_offpolicy_versions=0,  # strictly on-policy admission
        workers={"count": args.workers},
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--base-model", default="builtin:tiny")
    p.add_argument("--log-path", default="runs")
    p.add_argument("--run-id", default=None)
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--filter", action="store_true", help="drop zero-variance groups (dynamic_filter_fn)")
    p.add_argument("--eval-interval", type=int, default=0, help="run evaluation_fn every N versions (0 = off)")
    args = p.parse_args()
    result = main(build_config(args), rollout_fn_factory=make_rollout_fn,
                  dynamic_filter_fn=drop_zero_variance if args.filter else None,
                  evaluation_fn=evaluate if args.eval_interval else None,
                  evaluation_interval=max(1, args.eval_interval))
    print(f"done: run {result.run_id}, {result.steps} steps, version {result.version}, in {result.run_dir}")
