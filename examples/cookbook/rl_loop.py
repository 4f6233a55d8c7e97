"""The cookbook's rl_loop recipe (its GRPO guide's "Using the recipe" block), with only the
import lines, the model names and the dataset path changed (``# was:`` says from what). With no
rollout factory, ``main(cfg)`` runs the built-in single-turn rollout over the dataset's rows,
scored by ``reward_fn`` (``exact_match`` unless set). On the tiny model it only shows the
plumbing (60 rows make 60 steps of the cookbook's one group; the tiny model cannot answer GSM8K,
so every reward is 0), with completions short enough for its 128 positions:

    RLSTREAM_MAX_COMPLETION_TOKENS=4 RLSTREAM_WANDB_PROJECT="" python rl_loop.py

With a real model, set ``base_model`` and ``tokenizer_model`` to its directory and add
``reward_fn="math_answer"`` (GSM8K's final number).
"""
from pathlib import Path  # was: (not needed: the page names a fixed path)

from rlstream import Config, main  # was: from training.recipes.rl_loop import Config, main
from rlstream import DeployConfig, InfraConfig, WeightSyncConfig, WandBConfig  # was: from training.utils import ...

DATA = Path(__file__).resolve().parents[1] / "multi_turn_message_in" / "data.jsonl"  # GSM8K-format rows

cfg = Config(
    log_path="./grpo_logs",
    base_model="builtin:tiny",  # was: "accounts/fireworks/models/qwen3-8b"
    dataset=str(DATA),  # was: "/path/to/gsm8k.jsonl"
    max_rows=200,
    epochs=1,
    completions_per_prompt=4,
    max_completion_tokens=1024,
    temperature=1.0,
    max_seq_len=4096,
    policy_loss="grpo",  # or "importance_sampling", "dapo", "dro", "gspo", "cispo"
    infra=InfraConfig(
        training_shape_id="accounts/fireworks/trainingShapes/qwen3-8b-128k-h200",
        ref_training_shape_id="accounts/fireworks/trainingShapes/qwen3-8b-128k-h200-forward",
    ),
    deployment=DeployConfig(
        deployment_id="grpo-serving",
        tokenizer_model="builtin:tiny",  # was: "Qwen/Qwen3-8B"
    ),
    weight_sync=WeightSyncConfig(weight_sync_interval=1),
    wandb=WandBConfig(entity="my-team", project="grpo-experiment"),
)
main(cfg)
