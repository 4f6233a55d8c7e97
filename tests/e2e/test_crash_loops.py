"""The supervisor's restart policy end to end (issue 23; docs/design.md §15.83 Restarts give up
only on a crash loop), with the default thresholds: kills spread over a run never end it,
however many; a worker that crashes at once after every start ends it with the crash-loop
message."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from fault_harness import assert_audit_clean, assert_summary, running_up
from polling import wait_until

pytestmark = pytest.mark.e2e
HERE = str(Path(__file__).parent)  # slow_rollout.py, crash_at_start.py: for `up` and its children
DEFAULTS = ("RLSTREAM_MAX_RESTARTS", "RLSTREAM_MIN_UPTIME_S")


def env(monkeypatch) -> dict[str, str]:
    for name in DEFAULTS:  # the default policy, whatever the caller's environment says
        monkeypatch.delenv(name, raising=False)
    return {"RLSTREAM_TEST_ROLLOUT_DELAY_S": "0.05",
            "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), HERE) if p)}


def test_six_redis_and_six_worker_kills_spread_over_a_run_end_nothing(tmp_path, monkeypatch):
    """The chaos run of issue 23 ended on the embedded Redis's fourth death: a lifetime budget
    of three. Twelve kills, each once the run committed a step since the last one, alternate
    between redis-server and the worker; the run finishes and audits clean."""
    steps = 30
    args = ["--set", f"max_steps={steps}", "--set", "prompt_groups_per_step=4", "--set", "completions_per_prompt=4",
            "--set", "job_timeout=10", "--set", "dcp_save_interval=10",
            "--set", 'rollout_fn_factory="slow_rollout:factory"']
    with running_up(tmp_path, "spread", *args, env=env(monkeypatch)) as up:
        up.wait_steps(1, timeout=120)
        kills = []
        for n in range(12):
            role = "redis-server" if n % 2 == 0 else "worker"
            pid = wait_until(lambda: up.redis_pid() if role == "redis-server" else next(iter(up.child_pids(role)),
                                                                                             None),
                             60, f"a live {role} of the run")
            before = up.steps()
            os.kill(pid, signal.SIGKILL)
            kills.append(f"{role}@{before}")
            if up.steps() >= steps:
                break
            up.wait_steps(min(before + 1, steps), timeout=120)  # progress since the kill: a new incident next time
        assert up.wait_exit(timeout=300) == 0, f"kills {kills}\n{up.logs()}"
        assert_summary(up, steps)
        assert len(kills) >= 10, kills
        assert_audit_clean(up.run_dir, tmp_path, up.logs())


def test_a_worker_that_crashes_at_once_after_every_start_ends_the_run(tmp_path, monkeypatch):
    args = ["--set", "max_steps=5", "--set", "prompt_groups_per_step=2", "--set", "completions_per_prompt=4",
            "--set", 'rollout_fn_factory="crash_at_start:factory"']
    with running_up(tmp_path, "loop", *args, env=env(monkeypatch)) as up:
        assert up.wait_exit(timeout=180) == 1, up.logs()
        err = up.stderr()
        assert "worker-0 exited with code 3: a crash loop, 4 crashes in a row" in err, up.logs()
        assert "RLSTREAM_MAX_RESTARTS=3, RLSTREAM_MIN_UPTIME_S=60" in err and "worker-0.log" in err, err
