"""A deliberately slow rollout for tests/e2e/test_staleness_run.py: the built-in single-turn
rollout, except that the rows named in ``extras.slow_rows`` wait, before they sample (so they
keep the weights their job started with), until the trainer has logged ``extras.steps_ahead``
more steps than when the row started: a straggler the trainer must drop as stale. The other
rows wait until a slow row has started (``extras.marker``, which records the step count the
straggler waits for), so the trainer cannot finish the run while a worker is still importing
torch; and once the trainer has reached that step count they wait until the straggler has
sampled (``<marker>.done``), so that the tiny model's fast steps cannot end the run before the
straggler arrives. Every wait is bounded by ``extras.wait_s`` (below the job timeout), after
which the row samples anyway.

The test copies this file next to its config; ``rlstream up`` imports user modules from the
config file's directory.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from rlstream.builtin.rewards import resolve_reward
from rlstream.builtin.rollout import single_turn_factory


def _steps(metrics: Path) -> int:
    try:
        return sum(1 for line in metrics.read_text().splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def make_rollout_fn(setup):
    inner = single_turn_factory(resolve_reward("exact_match"))(setup)
    extras = setup.extras
    metrics, marker, slow_rows = Path(extras["metrics"]), Path(extras["marker"]), set(extras["slow_rows"])
    started: dict[int, int] = {}  # slow row -> steps logged when its first draw began

    async def wait(done) -> None:
        deadline = time.monotonic() + extras["wait_s"]
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    done = marker.with_name(marker.name + ".done")

    async def rollout_fn(row, *, row_index: int = 0, evaluation: bool = False):
        if row_index in slow_rows and not evaluation:
            target = started.setdefault(row_index, _steps(metrics)) + extras["steps_ahead"]
            marker.write_text(str(target))
            await wait(lambda: _steps(metrics) >= target)
            sample = await inner(row)  # with the weights this job started with
            done.touch()
            return sample
        if not evaluation:
            await wait(lambda: marker.is_file() and marker.read_text().strip().isdigit())
            target = int(marker.read_text()) if marker.is_file() and marker.read_text().strip().isdigit() else 0
            if _steps(metrics) >= target:
                await wait(done.exists)
        return await inner(row)

    return rollout_fn
