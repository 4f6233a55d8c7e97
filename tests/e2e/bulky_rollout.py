"""The built-in task's rollout (same rows, model and reward) whose samples carry a
``BULK_BYTES`` text, so that the rollouts stream, not the events stream, dominates Redis's
memory as it does with real completions (the tiny model's samples are ~0.4 KB). Named by
``--set rollout_fn_factory="bulky_rollout:factory"`` (tests/e2e on PYTHONPATH)."""
from __future__ import annotations

import dataclasses
from typing import Any

from rlstream.builtin.rewards import resolve_reward
from rlstream.builtin.rollout import single_turn_factory

BULK_BYTES = 8192


def factory(setup: Any):
    inner = single_turn_factory(resolve_reward("exact_match"))(setup)

    async def rollout_fn(sample_prompt: dict[str, Any]):
        sample = await inner(sample_prompt)
        return None if sample is None else dataclasses.replace(sample, text=sample.text + "." * BULK_BYTES)

    return rollout_fn
