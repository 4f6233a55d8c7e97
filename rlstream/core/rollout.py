"""The user-facing rollout contract (the Fireworks cookbook's async recipe):
``rollout_fn_factory(setup: RolloutSetup) -> async rollout_fn(sample_prompt) ->
RolloutSample | None``. No torch here; the sampler object comes from the worker.

``RolloutSample`` is the cookbook's plain dataclass (lists in, lists out, ``replace`` /
``asdict`` / assignment): users build and edit it freely, and nothing is checked until the
worker converts it with ``to_record`` into the wire's ``RolloutRecord`` (packed arrays, the
invariants, the provenance stamp; docs/design.md §15.88 RolloutSample is the user's dataclass,
the wire record is the codec's)."""
from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from pydantic import ValidationError

from rlstream.core.messages import RolloutRecord

log = logging.getLogger(__name__)


@dataclass
class RolloutSample:
    """One completion as ``rollout_fn`` returns it (the cookbook's ``RolloutSample``): three
    parallel per-token lists and the reward. Positional as in the cookbook's docs:
    ``RolloutSample(tokens, logprobs, loss_mask, reward, finish_reason, text)``."""

    tokens: list[int]  # prompt + completion
    logprobs: list[float]  # behaviour logprob per token, 0.0 on positions not generated
    loss_mask: list[int]  # 1 on policy-generated tokens, 0 elsewhere
    reward: float
    finish_reason: str = "stop"
    text: str = ""  # decoded completion, for logs
    # The cookbook's optional fields. raw_logprobs is checked (one per token) and not used: the drift
    # metrics compare the trainer's logprobs with ``logprobs``. routing_matrices is not used: the
    # trainer runs the HF model's own forward, which routes every token itself (no routing replay).
    # prompt_model_input (multimodal input) is refused: rlstream trains text-only causal LMs.
    prompt_model_input: Any = None
    routing_matrices: list[str] | None = None
    raw_logprobs: list[float] | None = None
    # rlstream's own: numbers per sample (metrics["accuracy"] feeds rollout/accuracy) and, for
    # advantage = "igpo", the ground-truth answer's token ids.
    metrics: dict[str, float] = field(default_factory=dict)
    answer_tokens: list[int] = field(default_factory=list)

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> RolloutSample:
        """rlstream 0.1's spelling (the sample was a pydantic model then), kept for a release:
        use ``dataclasses.replace(sample, **update)``."""
        warnings.warn("RolloutSample is a dataclass now: use dataclasses.replace(sample, ...) instead of "
                      "sample.model_copy(update=...)", DeprecationWarning, stacklevel=2)
        return dataclasses.replace(copy.deepcopy(self) if deep else self, **(update or {}))


class InvalidSample(ValueError):
    """A ``RolloutSample`` the trainer could not train on; ``str(err)`` says what to fix."""


WHY_UNUSED = "docs/design.md §15.88 RolloutSample is the user's dataclass, the wire record is the codec's"
_unused_noted: set[str] = set()  # the unused optional fields this process has logged once


def to_record(sample: RolloutSample) -> RolloutRecord:
    """The wire record of ``sample`` (not stamped yet), its invariants checked: equal lengths,
    >= 2 tokens, mask values 0/1 with at least one 1, token ids >= 0, finite reward and
    logprobs, numbers not given as text. Raise ``InvalidSample`` saying what to fix."""
    if sample.prompt_model_input is not None:
        raise InvalidSample("prompt_model_input is set, but rlstream trains text-only causal LMs: multimodal "
                            "input is not supported; leave it None and put the prompt's token ids in tokens")
    if not isinstance(sample.finish_reason, str) or not isinstance(sample.text, str):
        name, value = ("finish_reason", sample.finish_reason) if not isinstance(sample.finish_reason, str) \
            else ("text", sample.text)
        raise InvalidSample(f"{name} must be a str, got {type(value).__name__}; RolloutSample's 5th and 6th "
                            "positional arguments are finish_reason and text: pass prompt_model_input, "
                            "routing_matrices and raw_logprobs by keyword")
    try:
        record = RolloutRecord(tokens=sample.tokens, logprobs=sample.logprobs, loss_mask=sample.loss_mask,
                               reward=sample.reward, finish_reason=sample.finish_reason, text=sample.text,
                               metrics=sample.metrics, answer_tokens=sample.answer_tokens)
    except ValidationError as exc:
        raise InvalidSample(validation_message(exc)) from None
    # Checked against the record's tokens (the user's may be anything, None included: the record
    # has said what is wrong with them), so that a bad field is an InvalidSample, never a TypeError.
    if sample.raw_logprobs is not None:
        if not hasattr(sample.raw_logprobs, "__len__"):
            raise InvalidSample(f"raw_logprobs must be a list of floats (or None), got "
                                f"{type(sample.raw_logprobs).__name__}")
        if len(sample.raw_logprobs) != len(record.tokens):
            raise InvalidSample(f"raw_logprobs has {len(sample.raw_logprobs)} values for {len(record.tokens)} tokens: "
                                "when set, it needs one per token, as logprobs (or leave it None: it is not used)")
    for name in ("routing_matrices", "raw_logprobs"):
        if getattr(sample, name) is not None and name not in _unused_noted:
            _unused_noted.add(name)
            log.info("RolloutSample.%s is accepted and not used (%s)", name, WHY_UNUSED)
    return record


def validation_message(exc: ValidationError) -> str:
    """pydantic's errors on one line: ``field: message``, or just the message for the
    sample's invariants (pydantic's "Value error, " prefix dropped)."""
    return "; ".join(": ".join(part for part in (".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, "))
                               if part) for e in exc.errors())


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
