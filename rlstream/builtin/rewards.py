"""Reward functions for the built-in single-turn rollout, chosen by ``reward_fn``:
``reward(completion_text, row) -> float``, where ``row`` is the dataset row (its
``answer`` field is the reference)."""
from __future__ import annotations

import re
from typing import Any, Callable

from rlstream.builtin.task import exact_match_reward
from rlstream.core.config import BUILTIN_REWARDS

RewardFn = Callable[[str, dict[str, Any]], float]
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def exact_match(completion_text: str, row: dict[str, Any]) -> float:
    return exact_match_reward(completion_text, str(row.get("answer", "")))


def final_number(text: str) -> float | None:
    """The answer a GSM8K-style text commits to: what follows ``####`` if present, else the
    last number in the text (thousands separators ignored)."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    numbers = _NUMBER_RE.findall(text)
    if not numbers:
        return None
    try:
        return float(numbers[-1].replace(",", ""))
    except ValueError:
        return None


def math_answer(completion_text: str, row: dict[str, Any]) -> float:
    """1.0 when the completion's final number equals the row answer's final number."""
    got, want = final_number(completion_text), final_number(str(row.get("answer", "")))
    return 1.0 if got is not None and want is not None and abs(got - want) < 1e-6 else 0.0


# keyed by function name: the names are rlstream.core.config.BUILTIN_REWARDS
_BUILTIN: dict[str, RewardFn] = {fn.__name__: fn for fn in (exact_match, math_answer)}


def resolve_reward(spec: str) -> RewardFn:
    """A built-in reward by name (BUILTIN_REWARDS), else the user's ``'module:function'``."""
    if spec in BUILTIN_REWARDS:
        return _BUILTIN[spec]
    from rlstream.core.imports import import_object

    return import_object(spec, "reward_fn")
