"""What ``rlstream up`` hands its children, and how the CLI finds user code."""
from __future__ import annotations

import sys

from rlstream import cli
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
