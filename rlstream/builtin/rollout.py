"""The built-in single-turn rollout (the cookbook's ``rl_loop`` path): sample the row's
prompt once, score the completion with ``reward_fn``.

Rows carry ``prompt`` (str), ``prompt_token_ids`` or ``messages`` (assistant turns are
removed; the chat template is applied with the tokenizer).
"""
from __future__ import annotations

import weakref
from typing import Any

from rlstream.builtin.rewards import RewardFn
from rlstream.core.messages import RolloutSample
from rlstream.core.rollout import RolloutFn, RolloutSetup, chat_prompt_ids


def prompt_token_ids(row: dict[str, Any], tokenizer: Any) -> list[int]:
    if "prompt_token_ids" in row:
        return list(row["prompt_token_ids"])
    if "messages" in row:
        return chat_prompt_ids(tokenizer, [m for m in row["messages"] if m["role"] != "assistant"])
    return text_ids(tokenizer, row["prompt"])


# A worker tokenizes a row's prompt once per group (the row check) and once per draw: G + 1 times
# the same text. The ids of recent prompts are kept per tokenizer (a tokenizer's answer for a text
# does not change); chat rows are not (a template may read the date).
_TEXT_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _TextCache
CACHED_TEXTS, CACHED_TOKENS = 4096, 1 << 20  # the cache is emptied when it holds more of either


class _TextCache:
    def __init__(self) -> None:
        self.ids: dict[str, tuple[int, ...]] = {}
        self.tokens = 0  # about the ids held (job threads may add beside the sampling loop: a bound, not a count)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """``tokenizer(text, add_special_tokens=False)["input_ids"]``, from the cache when it was asked
    lately (a new list each time: callers may change it)."""
    try:
        cache = _TEXT_IDS.get(tokenizer)
        if cache is None:
            cache = _TEXT_IDS[tokenizer] = _TextCache()
    except TypeError:  # not hashable or not weakly referenceable: no cache
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = cache.ids.get(text)
    if ids is None:
        ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(cache.ids) >= CACHED_TEXTS or cache.tokens + len(ids) > CACHED_TOKENS:
            cache.ids, cache.tokens = {}, 0
        cache.ids[text] = ids
        cache.tokens += len(ids)
    return list(ids)


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
