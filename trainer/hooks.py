"""User hooks the trainer runs, named in config as ``"module:function"``:
``dynamic_filter_fn(group) -> bool`` on each assembled group, and
``evaluation_fn(ctx) -> dict[str, float]`` (sync or async) with a sampler on the current
weights, at the start, every ``evaluation_interval`` published versions and at the end.
``ctx.rollout_fn`` is the run's own rollout_fn over that sampler, called with
``evaluation=True``; it is built the first time it is used.

A user function that raises must not stop the trainer: it would raise again on the same
group or version after every restart (a crash loop). ``hook_failed`` turns the exception
into the one-line reason the trainer records instead (docs/design.md §10 Failure semantics)."""
from __future__ import annotations

import asyncio
import functools
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from rlstream.core.config import Config
from rlstream.core.imports import import_object
from rlstream.sampling.rollout_fn import evaluation_rollout, resolve_factory


@dataclass(frozen=True)
class EvaluationContext:
    sampler: Any  # async sampler over the trainer's current weights (same API as setup.sampler)
    tokenizer: Any
    version: int
    step: int
    sample_kwargs: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)
    config: Config | None = None  # the run's config (the trainer passes it; ctx.rollout_fn needs it)

    @functools.cached_property
    def rollout_fn(self):
        """``await ctx.rollout_fn(row, *, row_index=0, epoch=0, sample_index=0)``: the run's
        ``rollout_fn_factory`` (or the built-in rollout) applied to a ``RolloutSetup`` over
        ``ctx.sampler``, called with the context keywords it declares and ``evaluation=True``.
        Built on first access, once per context."""
        if self.config is None:
            raise RuntimeError("ctx.rollout_fn needs the run's config: build the EvaluationContext with config=cfg")
        from rlstream.core.rollout import RolloutSetup

        setup = RolloutSetup(sampler=self.sampler, tokenizer=self.tokenizer, sample_kwargs=dict(self.sample_kwargs),
                             completions_per_prompt=self.config.completions_per_prompt, extras=dict(self.extras))
        return evaluation_rollout(resolve_factory(self.config)(setup))


EVAL_FAILED = "eval/failed"  # the metric an evaluation that raised records instead of its own
REASON_LIMIT = 300  # characters of a hook's error kept in a GroupRejected reason


def hook_failed(name: str, exc: BaseException) -> str:
    """``"<name> raised <Type>: <message>"``, truncated to REASON_LIMIT characters."""
    text = f"{name} raised {type(exc).__name__}: {exc}"
    return text if len(text) <= REASON_LIMIT else text[:REASON_LIMIT - 3] + "..."


def filter_keeps(answer: Any) -> bool:
    """dynamic_filter_fn's answer as a keep/reject decision. A NaN would be truthy (a keep)
    by accident, so a non-finite number raises instead."""
    try:
        number = float(answer)
    except Exception:  # not a number (None, a list): plain truthiness decides
        number = 0.0
    if not math.isfinite(number):
        raise ValueError(f"returned {answer!r}, not a bool")
    return bool(answer)


def load_filter(cfg: Config):
    return import_object(cfg.dynamic_filter_fn, "dynamic_filter_fn") if cfg.dynamic_filter_fn else None


def load_evaluation(cfg: Config):
    return import_object(cfg.evaluation_fn, "evaluation_fn") if cfg.evaluation_fn else None


def run_evaluation(fn, ctx: EvaluationContext) -> dict[str, float]:
    """Call the user's evaluation_fn; return its metrics as ``eval/<name>`` floats."""
    result = asyncio.run(fn(ctx)) if inspect.iscoroutinefunction(fn) else fn(ctx)
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    if not isinstance(result, dict):
        raise TypeError(f"evaluation_fn must return dict[str, float], got {type(result).__name__}")
    out = {}
    for key, value in result.items():
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"evaluation_fn returned a non-finite {key!r}: {value}")
        out[f"eval/{key}"] = value
    return out
