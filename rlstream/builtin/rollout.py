"""The built-in single-turn rollout (the cookbook's ``rl_loop`` path): sample the row's
prompt once, score the completion with ``reward_fn``.

Rows carry ``prompt`` (str), ``prompt_token_ids`` or ``messages`` (assistant turns are
removed; the chat template is applied with the tokenizer).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from rlstream.builtin.rewards import RewardFn
from rlstream.core.rollout import RolloutFn, RolloutSample, RolloutSetup, chat_prompt_ids


def prompt_token_ids(row: dict[str, Any], tokenizer: Any) -> list[int]:
    if "prompt_token_ids" in row:
        return list(row["prompt_token_ids"])
    if "messages" in row:
        return chat_prompt_ids(tokenizer, [m for m in row["messages"] if m["role"] != "assistant"])
    return tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]


class PromptIds:
    """``prompt_token_ids`` with the tokenizer's work on a ``prompt`` text cached (the most
    recent ``size`` texts): a group's G draws tokenize its prompt once (tokenizing each was a
    quarter of a local worker's CPU on one-token completions); the worker's row check keeps a
    cache of its own. Jobs in threads of their own share one (the lock)."""

    def __init__(self, tokenizer: Any, size: int = 4096):
        self.tokenizer, self.size = tokenizer, size
        self._ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, row: dict[str, Any]) -> list[int]:
        text = row.get("prompt") if "prompt_token_ids" not in row and "messages" not in row else None
        if not isinstance(text, str):
            return prompt_token_ids(row, self.tokenizer)
        with self._lock:
            ids = self._ids.get(text)
            if ids is not None:
                self._ids.move_to_end(text)
                return list(ids)
        ids = tuple(prompt_token_ids(row, self.tokenizer))  # outside the lock: a tokenizer error is the row's
        with self._lock:
            self._ids[text] = ids
            if len(self._ids) > self.size:
                self._ids.popitem(last=False)
        return list(ids)


def single_turn_factory(reward_fn: RewardFn):
    """A ``rollout_fn_factory`` that scores with ``reward_fn(completion_text, row)``."""

    def make_rollout_fn(setup: RolloutSetup) -> RolloutFn:
        ids_of = PromptIds(setup.tokenizer)

        async def rollout_fn(sample_prompt: dict[str, Any]) -> RolloutSample | None:
            prompt = ids_of(sample_prompt)
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
