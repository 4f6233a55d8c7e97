"""The cookbook's async_rl_loop ``rollout.py`` and ``train.py`` as one file: the rollout factory
is defined in this script (its ``__main__``), as a notebook or a one-file ``train.py`` writes it.
``rlstream.main`` holds it and forks the rollout workers from this process, so they have it
without importing anything (docs/design.md §15.61 Script hooks run in a forked trainer). Only
the import lines, the model names and the rows are changed (``# was:`` says from what). Run it
from anywhere; on the tiny built-in model (the cookbook's 1024-token completions do not fit its
128 positions, and its 100 rows would end the run early), to watch it learn:

    RLSTREAM_LEARNING_RATE=1e-2 RLSTREAM_MAX_COMPLETION_TOKENS=1 RLSTREAM_MAX_ROWS=1000 RLSTREAM_MAX_STEPS=30 \
      python one_file.py

Workers started elsewhere (``rlstream worker``, another machine) import the factory by name:
for them, keep it in a module (``rollout.py`` + ``train.py``, as next to this file).
"""
import json  # was: (not needed: the page's rows are "...")
from pathlib import Path  # was: (not needed)

from rlstream import Config, main  # was: from training.recipes.async_rl_loop import Config, main
from rlstream import DeployConfig, TrainerConfig, WandBConfig  # was: from training.utils import ...
from rlstream import build_deployment_sampler  # was: from training.examples.rl.vanilla_sampler import ...
from rlstream import RolloutSample  # was: from training.utils.rl.rollout import RolloutSample
from rlstream.builtin.task import VOCAB


def score(c) -> float:
    """Your reward function: 1.0 when the completion is (a + b) mod 10 for the prompt "a+b="
    (rows are pre-tokenized in the built-in model's vocabulary, where token id i is VOCAB[i])."""
    a, _, b, _ = (VOCAB[t] for t in c.full_tokens[:c.prompt_len])
    return 1.0 if c.text.strip() == str((int(a) + int(b)) % 10) else 0.0


# ---- the page's rollout.py, unchanged ----
def make_rollout_fn(setup):
    sampler = build_deployment_sampler(setup)
    sample_kwargs = dict(setup.sample_kwargs)

    async def rollout_fn(sample_prompt: dict) -> RolloutSample | None:
        completions = await sampler.sample_with_prompt_tokens(
            sample_prompt["prompt_token_ids"], n=1, **sample_kwargs,
        )
        if not completions:
            return None
        c = completions[0]
        output = list(c.full_tokens)[c.prompt_len:]
        return RolloutSample(
            tokens=list(c.full_tokens),
            logprobs=[0.0] * c.prompt_len + list(c.inference_logprobs),
            loss_mask=[0] * c.prompt_len + [1] * len(output),
            reward=score(c),                       # your reward function
            finish_reason=c.finish_reason,
            text=c.text,
        )

    return rollout_fn


# ---- the page's train.py ----
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
main(cfg, rollout_fn_factory=make_rollout_fn, rows=rows)
