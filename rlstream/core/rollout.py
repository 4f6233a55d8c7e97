"""The user-facing rollout contract (the Fireworks cookbook's async recipe):
``rollout_fn_factory(setup: RolloutSetup) -> async rollout_fn(sample_prompt) ->
RolloutSample | None``. No torch here; the sampler object comes from the worker."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from rlstream.core.messages import RolloutSample


@dataclass(frozen=True)
class Completion:
    """One sampled completion, as ``setup.sampler`` returns it."""

    full_tokens: list[int]  # prompt + generated tokens
    prompt_len: int
    inference_logprobs: list[float]  # one per generated token, from the sampled distribution
    finish_reason: str  # "stop" (eos) | "length"
    text: str  # decoded generated part
    version: int  # policy version that sampled it

    @property
    def output_tokens(self) -> list[int]:
        return self.full_tokens[self.prompt_len:]


@dataclass(frozen=True)
class RolloutSetup:
    """What ``rollout_fn_factory`` receives once per worker process."""

    sampler: Any
    tokenizer: Any
    sample_kwargs: dict[str, Any]
    completions_per_prompt: int
    extras: dict[str, Any] = field(default_factory=dict)


def build_deployment_sampler(setup: RolloutSetup) -> Any:
    """The cookbook's ``build_deployment_sampler(setup)``: the sampler this worker built for the
    run (the local model on the newest published weights, or the configured inference server),
    with ``sample_with_prompt_tokens`` and ``sample_with_tokens``. There is nothing to build:
    the worker owns it, keeps its weights current and closes it."""
    sampler = getattr(setup, "sampler", None)
    if sampler is None:
        raise ValueError("build_deployment_sampler takes the RolloutSetup your rollout_fn_factory received; "
                         f"got {type(setup).__name__} without a sampler")
    return sampler


NO_LIMIT = 1 << 30  # max_seq_len when a caller gives none


def token_budget(prompt_len: int, max_tokens: int, max_seq_len: int = NO_LIMIT) -> int:
    """New tokens one prompt may get: its own room under max_seq_len, never a batch-mate's."""
    return min(max_tokens, max_seq_len - prompt_len)


def no_room(prompt_len: int, max_seq_len: int) -> ValueError:
    return ValueError(f"prompt of {prompt_len} tokens leaves no room under max_seq_len {max_seq_len}; "
                      "shorten the prompt or raise max_seq_len")


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
    """A chat rendered by the tokenizer's chat template, as token ids, with the generation
    prompt by default (transformers returns a list, or a mapping holding ``input_ids``, by
    version)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)


RolloutFn = Callable[[dict[str, Any]], Awaitable[RolloutSample | None]]
RolloutFnFactory = Callable[[RolloutSetup], RolloutFn]
