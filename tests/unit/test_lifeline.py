"""Children die with their supervisor, even a SIGKILLed one (rlstream.core.lifeline): the
prctl(PR_SET_PDEATHSIG) preexec_fn (which survives exec: it covers redis-server) and the
getppid watch of Python children. Real processes; every wait bounded."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlstream import launcher
from rlstream.core.errors import RunFailed
from rlstream.core.lifeline import SUPERVISOR_ENV, _prctl

# The middle process plays `rlstream up`: it starts a grandchild (in its own session, as up
# does), prints the grandchild's pid, and sleeps until the test SIGKILLs it.
MIDDLE = """
import os, signal, subprocess, sys, time
from rlstream.core.lifeline import SUPERVISOR_ENV, die_with_parent
mode = sys.argv[1]
if mode == "prctl":  # an exec'd program that cannot set anything itself (as redis-server)
    child = subprocess.Popen(["sleep", "120"], start_new_session=True, preexec_fn=die_with_parent(signal.SIGTERM))
else:  # a Python child that only watches its parent's pid
    code = "from rlstream.core.lifeline import watch_supervisor_from_env as w; import time; w(); time.sleep(120)"
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                             env={**os.environ, SUPERVISOR_ENV: str(os.getpid())})
print(child.pid, flush=True)
time.sleep(120)
"""


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # a zombie no one reaped yet
    except OSError:
        return True


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("mode", ["prctl", "watch"])
def test_grandchild_dies_when_its_supervisor_is_sigkilled(mode):
    if mode == "prctl" and _prctl() is None:
        pytest.skip("prctl(PR_SET_PDEATHSIG) is Linux-only")
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, mode], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(middle.stdout.readline())
        assert not gone(grandchild)
        os.kill(middle.pid, signal.SIGKILL)
        middle.wait(10)
        assert wait_gone(grandchild, 15), f"pid {grandchild} outlived its supervisor ({mode})"
    finally:
        middle.kill()
        middle.wait()


def test_up_passes_its_pid_to_children_and_validates_the_restart_settings(monkeypatch):
    from rlstream import restart_policy as restarts

    assert launcher._child_env()[SUPERVISOR_ENV] == str(os.getpid())
    monkeypatch.setenv(restarts.MAX_RESTARTS_ENV, "40")
    assert restarts.max_restarts() == 40
    monkeypatch.setenv(restarts.MAX_RESTARTS_ENV, "lots")
    with pytest.raises(RunFailed, match="RLSTREAM_MAX_RESTARTS"):
        restarts.check_settings()
    monkeypatch.delenv(restarts.MAX_RESTARTS_ENV)
    assert restarts.max_restarts() == restarts.MAX_RESTARTS
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(restarts.MIN_UPTIME_ENV, bad)
        with pytest.raises(RunFailed, match="RLSTREAM_MIN_UPTIME_S"):
            restarts.check_settings()
    monkeypatch.setenv(restarts.MIN_UPTIME_ENV, "5")
    assert restarts.min_uptime_s() == 5.0
