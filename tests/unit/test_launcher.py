"""What ``rlstream up`` hands its children, and how the CLI finds user code."""
from __future__ import annotations

import sys

import pytest

from rlstream import cli, launcher
from rlstream import restart_policy as restarts
from rlstream.core.errors import RunFailed
from rlstream.core.run_state import RunState
from rlstream.launcher import _child_env


def test_children_do_not_reapply_config_overrides_from_the_environment(monkeypatch):
    """config.json already holds the resolved values: a child re-reading RLSTREAM_SEED or
    RLSTREAM_RUN_ID would undo `--set seed=...` / `--run-id` and split the run."""
    monkeypatch.setenv("RLSTREAM_SEED", "1")
    monkeypatch.setenv("RLSTREAM_RUN_ID", "other")
    monkeypatch.setenv("RLSTREAM_REDIS_URL", "redis://elsewhere:6379/0")
    monkeypatch.setenv("RLSTREAM_LOG_LEVEL", "DEBUG")  # not a config field: passed on
    env = _child_env()
    assert not {"RLSTREAM_SEED", "RLSTREAM_RUN_ID", "RLSTREAM_REDIS_URL"} & set(env)
    assert env["RLSTREAM_LOG_LEVEL"] == "DEBUG"


def test_console_script_imports_user_modules_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cfgdir").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    cli._user_import_path("cfgdir/run.toml")
    assert str(tmp_path) in sys.path and str(tmp_path / "cfgdir") in sys.path


class ExitedProcess:
    def __init__(self, code: int):
        self.code = code

    def poll(self) -> int:
        return self.code


def test_crash_loop_stops_the_run_but_a_crash_after_progress_is_a_new_incident(tmp_path, monkeypatch):
    child = launcher.Child("worker-0", "worker", ExitedProcess(-9), tmp_path / "worker-0.log")
    child.policy.quick_crashes = restarts.MAX_RESTARTS  # three quick crashes in a row so far
    state = RunState()
    with pytest.raises(RunFailed, match="worker-0 exited with code -9: a crash loop, 4 crashes in a row"):
        launcher._check_child(child, state, tmp_path / "config.json")
    state.steps = 1  # a step was committed since it started: this crash is a new incident
    launcher._check_child(child, state, tmp_path / "config.json")
    assert child.policy.quick_crashes == 0 and child.restart_at is not None


def test_a_source_tree_in_the_working_directory_cannot_shadow_the_installed_package(tmp_path, monkeypatch):
    """A child runs ``python -P -m rlstream.cli`` with ``_child_env``'s path: started from a
    directory holding some other ``rlstream/`` (a source checkout, whose role packages
    install inside rlstream and are absent from its folder), it still imports this one."""
    import subprocess

    import rlstream

    fake = tmp_path / "rlstream"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the shadowing copy was imported')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["", *sys.path])  # as under `python -m` from this directory
    probe = "import rlstream, rlstream.trainer.trainer; print(rlstream.__file__)"
    proc = subprocess.run([sys.executable, "-P", "-c", probe], env=_child_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == rlstream.__file__
    spawned = launcher._spawn.__code__.co_consts
    assert "-P" in spawned, "children must start with -P (no working directory in front of sys.path)"


def test_an_outage_of_redis_is_logged_when_it_starts_and_then_every_30_s(monkeypatch, caplog):
    """A flaky network made the supervisor log "lost Redis" twice a second for as long as it lasted."""
    clock = [100.0]
    monkeypatch.setattr(launcher.time, "monotonic", lambda: clock[0])
    watch = launcher.Watch.__new__(launcher.Watch)
    watch.redis_lost = None
    with caplog.at_level("WARNING", logger=launcher.__name__):
        for _ in range(100):  # 50 s of failed reads, two a second
            watch._redis_lost(ConnectionError("Connection refused"))
            clock[0] += 0.5
    said = [r.getMessage() for r in caplog.records if "lost Redis" in r.getMessage()]
    assert len(said) == 2, said
    assert said[1].endswith("; 61 failed reads in 30 s"), said
