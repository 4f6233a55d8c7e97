"""The built-in task's rollout (same rows, model and reward) with a pause before each draw,
for the chaos test: the tiny model's jobs take milliseconds, so a worker killed "at a
random moment" would nearly always be idle; with each job taking ~``DELAY_S`` most kills
land mid-job, where rq's bookkeeping is left half done (executions, registries).
Named by ``--set rollout_fn_factory="slow_rollout:factory"``; the delay comes from
``RLSTREAM_TEST_ROLLOUT_DELAY_S`` (not a config field)."""
from __future__ import annotations

import asyncio
import os
from typing import Any

from rlstream.builtin.rewards import resolve_reward
from rlstream.builtin.rollout import single_turn_factory

DELAY_S = float(os.environ.get("RLSTREAM_TEST_ROLLOUT_DELAY_S", "0.2"))


def factory(setup: Any):
    inner = single_turn_factory(resolve_reward("exact_match"))(setup)

    async def rollout_fn(sample_prompt: dict[str, Any]):
        await asyncio.sleep(DELAY_S)
        return await inner(sample_prompt)

    return rollout_fn
