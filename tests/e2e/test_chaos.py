"""Chaos (issue "Reliability II", acceptance): one run of the built-in task while a seeded
random sequence SIGKILLs its worker, producer, trainer and embedded redis-server every
few seconds. The run must finish by itself (bounded wait) with ``rlstream audit`` exiting 0.

Design:
- Kills come in rounds; each round is a seeded random order of the four roles, so every
  role is killed about equally often, at seeded random moments (``GAP_S`` apart) wherever
  the run happens to be (mid-job, mid-commit, mid-restart, while Redis loads its AOF).
- ``rlstream up``'s own supervision restarts what is killed. Its default policy ends a run on
  a crash loop (more than 3 crashes in a row within a minute of each start with no step in
  between: rlstream/restart_policy.py); kills seconds apart can look like one, so the test raises
  the count through ``RLSTREAM_MAX_RESTARTS`` (the documented knob), because many kills per
  run is the point. tests/e2e/test_crash_loops.py checks the default policy.
- Rollouts pause ``DELAY_S`` per draw (``slow_rollout.py``: the built-in task otherwise),
  so that workers are mid-job most of the time and their kills leave rq's bookkeeping
  half done, as with real models (the tiny model's jobs take milliseconds).
- ``job_timeout=10`` so that a killed worker's job is re-run within seconds (heartbeat TTL
  5 s), and a few checkpoints (``dcp_save_interval``) so that trainer restarts resume.
- One seed runs by default (about a minute on 2 cores: the whole suite must stay under 10
  minutes); a second seed of the same length and six longer kill sequences run under the
  ``slow`` marker (skipped unless ``pytest -m slow``).
"""
from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
from fault_harness import assert_audit_clean, assert_summary, running_up

pytestmark = pytest.mark.e2e
ROLES = ("worker", "producer", "trainer", "redis-server")
GAP_S = (1.0, 3.0)  # seconds between kills, drawn uniformly
RESTART_BUDGET = "1000"
DELAY_S = "0.2"  # per draw; a job (G draws run concurrently) takes about this long


def chaos_run(tmp_path: Path, seed: int, steps: int, kills: int, timeout: float) -> None:
    rng = random.Random(seed)
    run_id = f"chaos{seed}"
    small = ["--set", f"max_steps={steps}", "--set", "prompt_groups_per_step=4", "--set", "completions_per_prompt=4",
             "--set", "job_timeout=10", "--set", "dcp_save_interval=5", "--set", f"seed={seed}",
             "--set", 'rollout_fn_factory="slow_rollout:factory"']
    here = str(Path(__file__).parent)  # slow_rollout.py, for `up` and its children
    env = {"RLSTREAM_MAX_RESTARTS": RESTART_BUDGET, "RLSTREAM_TEST_ROLLOUT_DELAY_S": DELAY_S,
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), here) if p)}
    done: list[str] = []
    with running_up(tmp_path, run_id, *small, env=env) as up:
        up.wait_steps(1, timeout=120)
        deadline = time.monotonic() + timeout
        order: list[str] = []
        while len(done) < kills and up.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"chaos run {run_id} did not finish within {timeout:.0f}s; kills: {done}\n"
                                     f"{up.logs()}")
            time.sleep(rng.uniform(*GAP_S))  # a seeded random moment, not a wait for a condition
            order = order or rng.sample(ROLES, len(ROLES))
            role = order.pop()
            pids = [up.redis_pid()] if role == "redis-server" else up.child_pids(role)
            pids = [p for p in pids if p is not None]
            if not pids:  # being restarted right now: that role's kill is skipped this round
                done.append(f"{role}:absent@{up.steps()}")
                continue
            victim = rng.choice(pids)
            try:
                os.kill(victim, signal.SIGKILL)
                done.append(f"{role}:{victim}@{up.steps()}")
            except ProcessLookupError:
                done.append(f"{role}:gone@{up.steps()}")
        code = up.wait_exit(timeout=max(deadline - time.monotonic(), 60.0))
        context = f"seed {seed}, kills {done}\n"
        assert code == 0, context + up.logs()
        assert_summary(up, steps)
        killed = [d for d in done if ":absent" not in d and ":gone" not in d]
        assert len(killed) >= kills // 2, context  # the run really was under fire
        # Every exit up reports is one of our SIGKILLs: no process crashed on what a kill left
        # behind (the restart budget is large here, so a crash loop would otherwise go unseen).
        exits = re.findall(r"(\S+) exited with code (-?\d+)", up.stderr())
        assert all(c == "-9" for _, c in exits), context + f"{exits}\n" + up.logs()
    audit = assert_audit_clean(up.run_dir, tmp_path, context)
    print(context + audit)


@pytest.mark.parametrize("seed", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_chaos_kills_every_role_and_the_run_still_finishes(tmp_path: Path, seed: int) -> None:
    chaos_run(tmp_path, seed, steps=40, kills=12, timeout=240)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [3, 4, 5, 6, 7, 8])
def test_chaos_long(tmp_path: Path, seed: int) -> None:
    chaos_run(tmp_path, seed, steps=200, kills=30, timeout=480)
