"""End to end: a second trainer on a running run must not change it (docs/design.md §15.36 A
trainer lease fences every trainer write). ``rlstream up`` runs with no worker, so its trainer
holds the lease and waits; two more ``rlstream trainer runs/<id>/config.json`` start, one with
the run's config, one with a smaller ``max_steps``; only once both stand by does a worker
start. The run must finish with the first trainer's ``max_steps``, steps exactly 1..N, every
version published once, ``rlstream audit`` clean, and both standbys exit 0 when it finishes,
having written nothing.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fault_harness import assert_audit_clean, assert_steps_exactly, assert_summary, running_up
from polling import wait_until

from rlstream.core import bus, keys
from rlstream.core.connection import connect
from rlstream.core.credentials import PASSWORD_ENV
from rlstream.core.messages import RunFinished, StepCommitted, WeightsPublished

pytestmark = pytest.mark.e2e
RUN, STEPS = "two", 6


def start(role: str, config_path: str, *args: str, cwd: Path, log: Path, password: str) -> subprocess.Popen:
    """A process started by hand on the run: config.json holds the Redis URL without its
    password, which it takes from RLSTREAM_REDIS_PASSWORD (as an operator would give it)."""
    env = {**os.environ, PASSWORD_ENV: password}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "rlstream.cli", role, config_path, *args], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def test_second_trainers_stand_by_and_leave_the_run_unchanged(tmp_path: Path, redis_server) -> None:
    r = connect(redis_server.url)
    extra: list[subprocess.Popen] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("same", "fewer_steps", "worker")}
    try:
        with running_up(tmp_path, RUN, "--set", f"max_steps={STEPS}", "--set", "prompt_groups_per_step=4",
                        "--set", "completions_per_prompt=4", "--set", "workers.count=0",
                        env={"RLSTREAM_REDIS_URL": redis_server.url}) as up:
            # The run's own trainer holds the lease once it has published v0 (it then waits for samples).
            wait_until(lambda: any(isinstance(m, WeightsPublished) for _, m in bus.iter_all_events(r, RUN)), 120,
                       "the first trainer to publish v0", interval=0.2)
            (first,) = up.child_pids("trainer")
            holder = f"{socket.gethostname()}-{first}-"
            assert r.get(keys.trainer_lease(RUN)).decode().startswith(holder)

            extra.append(start("trainer", up.config_path, cwd=tmp_path, log=logs["same"],
                               password=redis_server.password))
            extra.append(start("trainer", up.config_path, "--set", "max_steps=2", cwd=tmp_path,
                               log=logs["fewer_steps"], password=redis_server.password))

            def standing_by(name: str) -> bool:
                assert all(p.poll() is None for p in extra), "\n".join(path.read_text() for path in logs.values()
                                                                        if path.exists())
                return f"standing by: trainer {holder}" in logs[name].read_text()

            for name in ("same", "fewer_steps"):
                wait_until(lambda name=name: standing_by(name), 120, f"trainer '{name}' to stand by", interval=0.2)

            extra.append(start("worker", up.config_path, cwd=tmp_path, log=logs["worker"],
                               password=redis_server.password))
            code = up.wait_exit(timeout=180)
            assert code == 0, up.logs()
            wait_until(lambda: all(p.poll() is not None for p in extra), 60, "the standbys and the worker to exit",
                       interval=0.2)
            for name, proc in zip(("same", "fewer_steps"), extra):
                text = logs[name].read_text()
                assert proc.returncode == 0, text
                assert f"run {RUN} finished (max_steps) while this trainer stood by" in text, text
                assert "replayed" not in text and "resuming" not in text, text  # it never resumed, let alone trained

            assert_summary(up, STEPS)
            assert_steps_exactly(up.run_dir, STEPS)
            assert_audit_clean(up.run_dir, tmp_path, env={PASSWORD_ENV: redis_server.password})
            events = [m for _, m in bus.iter_all_events(r, RUN)]
            assert [m.step for m in events if isinstance(m, StepCommitted)] == list(range(1, STEPS + 1))
            assert [m.version for m in events if isinstance(m, WeightsPublished)] == list(range(STEPS + 1))
            assert [(m.reason, m.step) for m in events if isinstance(m, RunFinished)] == [("max_steps", STEPS)]
            assert r.get(keys.trainer_lease(RUN)) is None  # released: a next trainer would start at once
    finally:
        for proc in extra:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        r.close()
