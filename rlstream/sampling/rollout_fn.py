"""Resolving and calling a rollout_fn, the same way in the workers and in the trainer's
evaluation: the run's ``rollout_fn_factory`` (or the built-in single-turn rollout), and the
context keywords (``row_index``, ``epoch``, ``sample_index``, ``evaluation``) a rollout_fn
receives when it declares them."""
from __future__ import annotations

import inspect
from typing import Any

from rlstream.builtin.rewards import resolve_reward
from rlstream.builtin.rollout import single_turn_factory
from rlstream.core.config import Config
from rlstream.core.imports import import_object

CONTEXT_PARAMS = ("row_index", "epoch", "sample_index", "evaluation")


def accepted_context(rollout_fn: Any) -> frozenset[str]:
    """The keyword context a rollout_fn declares (all of it with ``**kwargs``)."""
    params = inspect.signature(rollout_fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return frozenset(CONTEXT_PARAMS)
    return frozenset(p.name for p in params if p.name in CONTEXT_PARAMS)


def resolve_factory(cfg: Config):
    """The user's ``rollout_fn_factory`` by name, else the built-in single-turn rollout."""
    if cfg.rollout_fn_factory:
        return import_object(cfg.rollout_fn_factory, "rollout_fn_factory")
    return single_turn_factory(resolve_reward(cfg.reward_fn))


def evaluation_rollout(rollout_fn):
    """Wrap a rollout_fn for evaluation: it receives the context keywords it declares (as
    in the workers), with ``evaluation=True``; the row is passed as a copy."""
    accepted = accepted_context(rollout_fn)

    async def evaluate_rollout(sample_prompt: dict, *, row_index: int = 0, epoch: int = 0, sample_index: int = 0):
        context = dict(row_index=row_index, epoch=epoch, sample_index=sample_index, evaluation=True)
        return await rollout_fn(dict(sample_prompt), **{k: v for k, v in context.items() if k in accepted})

    return evaluate_rollout
