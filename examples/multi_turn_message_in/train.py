"""Train the multi-turn message-in example: ``python examples/multi_turn_message_in/train.py``.

    --base-model /path/to/hf-model   a real local chat model; its chat template must be
                                     prefix-stable (README.md, rollout.py)
    --end-of-turn-token TOKEN        the token that ends an assistant turn, when it is not eos
"""
import argparse
from pathlib import Path

from rollout import make_rollout_fn

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
        completions_per_prompt=4,
        prompt_groups_per_step=args.groups,
        max_completion_tokens=args.max_tokens,
        max_seq_len=args.max_seq_len,
        kl_beta=0.0,  # no reference model (the cookbook's default, 0.001, loads one)
        epochs=100,
        synchronous_training=True,  # each step trains exactly the rollouts of the current weights
        extras={"max_turns": 2, **({"end_of_turn_token": args.end_of_turn_token} if args.end_of_turn_token else {})},
        workers={"count": args.workers},
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--base-model", default="builtin:tiny")
    p.add_argument("--log-path", default="runs")
    p.add_argument("--run-id", default=None)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=120)
    p.add_argument("--end-of-turn-token", default=None, help="e.g. <end_of_turn> (default: the tokenizer's eos)")
    result = main(build_config(p.parse_args()), rollout_fn_factory=make_rollout_fn)
    print(f"done: run {result.run_id}, {result.steps} steps, version {result.version}, in {result.run_dir}")
