"""User hooks the trainer runs, named in config as ``"module:function"``:
``dynamic_filter_fn(group) -> bool`` on each assembled group, and
``evaluation_fn(ctx) -> dict[str, float]`` (sync or async) with a sampler on the current
weights, at the start, every ``evaluation_interval`` published versions and at the end."""
from __future__ import annotations

import asyncio
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

from rlstream.config import Config
from rlstream.imports import import_object


@dataclass(frozen=True)
class EvaluationContext:
    sampler: Any  # async sampler over the trainer's current weights (same API as setup.sampler)
    tokenizer: Any
    version: int
    step: int
    sample_kwargs: dict[str, Any]
    extras: dict[str, Any] = field(default_factory=dict)


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
