"""The built-in single-turn rollout (the cookbook's ``rl_loop`` path): sample the row's
prompt once, score the completion with ``reward_fn``.

Rows carry ``prompt`` (str), ``prompt_token_ids`` or ``messages`` (assistant turns are
removed; the chat template is applied with the tokenizer).
"""
from __future__ import annotations

from typing import Any

from rlstream.builtin.rewards import RewardFn
from rlstream.core.messages import RolloutSample
from rlstream.core.rollout import RolloutFn, RolloutSetup, chat_prompt_ids


def prompt_token_ids(row: dict[str, Any], tokenizer: Any) -> list[int]:
    if "prompt_token_ids" in row:
        return list(row["prompt_token_ids"])
    if "messages" in row:
        return chat_prompt_ids(tokenizer, [m for m in row["messages"] if m["role"] != "assistant"])
    return tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]


def single_turn_factory(reward_fn: RewardFn):
    """A ``rollout_fn_factory`` that scores with ``reward_fn(completion_text, row)``."""

    def make_rollout_fn(setup: RolloutSetup) -> RolloutFn:
        async def rollout_fn(sample_prompt: dict[str, Any]) -> RolloutSample | None:
            prompt = prompt_token_ids(sample_prompt, setup.tokenizer)
            [c] = await setup.sampler.sample_with_prompt_tokens(prompt, n=1, **setup.sample_kwargs)
            return RolloutSample(
                tokens=c.full_tokens,
                logprobs=[0.0] * c.prompt_len + c.inference_logprobs,
                loss_mask=[0] * c.prompt_len + [1] * len(c.output_tokens),
                reward=float(reward_fn(c.text, sample_prompt)),
                finish_reason=c.finish_reason,
                text=c.text,
            )

        return rollout_fn

    return make_rollout_fn
