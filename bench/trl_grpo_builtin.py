"""TRL's GRPOTrainer on rlstream's built-in task: the TRL half of bench/vs_trl.py.

Run by the side venv's python (TRL installed, rlstream not), so it imports nothing from rlstream:
bench/vs_trl.py writes the built-in model's HF directory (tokenizer included) and the prompts as
JSONL (``{"prompt": "3+4=", "answer": "7"}``) and passes both in::

    python bench/trl_grpo_builtin.py --model DIR --prompts rows.jsonl --log steps.jsonl

The settings are examples/builtin/config.toml's, in TRL's names: one generation batch per optimizer
step of 32 prompts x 8 completions (``per_device_train_batch_size = 256`` completions,
``steps_per_generation = 1``, no gradient accumulation), one-token completions, temperature 1.0,
lr 2e-3 with linear decay and no warm-up, beta 0, the ``grpo`` loss with group-std-scaled advantages,
rlstream's AdamW (betas 0.9/0.95, eps 1e-8, weight decay 0.01) and grad-norm clip 1.0, float32
(TRL's defaults are bf16 autocast and gradient checkpointing: both off here, as in rlstream),
CPU, nothing saved or reported. Each optimizer step appends one JSON line to ``--log``:
``{"step", "reward", "time"}`` (``time.time()`` when TRL logged the step), flushed at once so
the bench can watch it.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time

logger = logging.getLogger(__name__)

# rlstream.builtin.task.SPECIAL_TOKENS (not imported: rlstream is not in this venv)
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


def exact_match_reward(completions: list[str], answer: list[str], **_) -> list[float]:
    """rlstream.builtin.task.exact_match_reward over a batch, in TRL's reward-function shape:
    1.0 when the completion, stripped of whitespace and special tokens, equals the answer."""
    out = []
    for text, ans in zip(completions, answer):
        for special in SPECIAL_TOKENS:
            text = text.replace(special, "")
        out.append(1.0 if text.strip() == str(ans).strip() else 0.0)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="the built-in model's HF directory")
    ap.add_argument("--prompts", required=True, help="JSONL rows with prompt and answer")
    ap.add_argument("--log", required=True, help="per-step JSON lines written here")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--completions", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepLog(TrainerCallback):
        def __init__(self, path: str):
            self.f = open(path, "a")

        def on_log(self, _args, state, _control, logs=None, **_):
            if logs and "reward" in logs:
                self.f.write(json.dumps({"step": state.global_step, "reward": logs["reward"],
                                         "time": time.time()}) + "\n")
                self.f.flush()

    dataset = load_dataset("json", data_files=args.prompts, split="train")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
            max_steps=args.steps, seed=args.seed, bf16=False, gradient_checkpointing=False,
            per_device_train_batch_size=args.groups * args.completions, gradient_accumulation_steps=1,
            steps_per_generation=1, num_generations=args.completions, max_completion_length=1,
            temperature=1.0, beta=0.0, loss_type="grpo", scale_rewards="group",
            learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0,
            adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.01, max_grad_norm=1.0,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        if config.generation_batch_size != args.groups * args.completions:
            raise SystemExit(f"TRL's generation batch is {config.generation_batch_size} completions, "
                             f"not {args.groups} x {args.completions}")
        trainer = GRPOTrainer(model=model, reward_funcs=exact_match_reward, args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[StepLog(args.log)])
        trainer.train()


if __name__ == "__main__":
    main()
