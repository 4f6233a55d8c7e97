"""The cookbook's async_rl_loop ``train.py``, as its page shows it, with only the import lines,
the model names and the dataset rows changed (``# was:`` says from what), plus the page's
``dynamic_filter_fn`` lambda. Run it from this directory (``python train.py``). The page leaves
the completion length and the rows used at the cookbook's defaults (1024 tokens, which the tiny
built-in model's 128 positions cannot hold: the run stops at once and says so; 100 rows), and
its learning rate (1.7e-5) barely moves the tiny model, so to watch it learn:

    RLSTREAM_LEARNING_RATE=2e-3 RLSTREAM_MAX_COMPLETION_TOKENS=1 RLSTREAM_MAX_ROWS=1000 python train.py

(``RLSTREAM_<FIELD>`` variables override the script's Config, as they do a TOML file).
"""
import json  # was: (not needed: the page's rows are "...")
from pathlib import Path  # was: (not needed)

from rlstream import Config, main  # was: from training.recipes.async_rl_loop import Config, main
from rlstream import DeployConfig, TrainerConfig, WandBConfig  # was: from training.utils import ...
from rollout import make_rollout_fn  # your rollout.py (was: from my_rollout import ...)

cfg = Config(
    log_path="./gsm8k_logs",
    base_model="builtin:tiny",  # was: "accounts/fireworks/models/qwen3-8b"
    learning_rate=1.7e-5,
    completions_per_prompt=8,
    prompt_groups_per_step=8,
    policy_loss="grpo",                 # the "custom loss" knob
    max_head_offpolicy_versions=4,      # off-policy staleness budget (0 = on-policy)
    trainer=TrainerConfig(training_shape_id="accounts/fireworks/trainingShapes/qwen3-8b-128k-h200"),
    deployment=DeployConfig(tokenizer_model="builtin:tiny"),  # was: "Qwen/Qwen3-8B"
    wandb=WandBConfig(entity="my-team", project="gsm8k-rl"),
)

# was: rows = [...]  # dataset rows; each becomes a sample_prompt
DATA = Path(__file__).resolve().parents[1] / "single_turn_token_in" / "data.jsonl"  # the 100 "a+b=" problems
rows = [json.loads(line) for line in DATA.read_text().splitlines()] * 10
main(cfg, rollout_fn_factory=make_rollout_fn, rows=rows,
     dynamic_filter_fn=lambda pg: len(set(pg.rewards)) > 1)  # the page's "skip uniform-reward groups"
