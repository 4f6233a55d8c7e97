"""A role process forked (not exec'd) from the calling process, for hooks that exist only
there: ``rlstream.main(cfg, dynamic_filter_fn=lambda g: ...)`` from a script. The trainer
runs those hooks, and a lambda or a function of the script's ``__main__`` cannot be imported
by name in a fresh ``python -m rlstream.cli trainer`` process; a fork inherits them.

Everything else is the exec'd child's (docs/design.md §15.61 Script hooks run in a forked
trainer): its own session, PDEATHSIG and the supervisor watch, the child environment
``rlstream up`` builds (no ``RLSTREAM_<FIELD>`` re-applied, the Redis password), output to
``logs/trainer.log``, then exactly ``rlstream trainer config.json``'s code path and exit
codes. ``ForkedProcess`` is the ``subprocess.Popen`` subset the launcher supervises with,
so a crashed forked trainer is restarted (forked again) like any child.
"""
from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

POLL_S = 0.05


class ForkedProcess:
    """``poll``/``wait``/``terminate``/``kill``/``pid``/``returncode`` of a forked child."""

    def __init__(self, pid: int):
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)  # -N when killed by signal N, as Popen
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"forked pid {self.pid}", timeout)
            time.sleep(POLL_S)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _child_main(role: str, config_path: Path, env: dict[str, str]) -> int:
    """In the forked child: become what ``python -m rlstream.cli <role> config.json`` is."""
    os.environ.clear()
    os.environ.update(env)
    sys.argv = ["rlstream", role, str(config_path)]
    try:  # exactly `python -m rlstream.cli <role> config.json`, which exits with rlstream's own codes
        runpy.run_module("rlstream.cli", run_name="__main__")  # the script's __main__ stays in place
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


def fork_role(role: str, config_path: Path, log_path: Path, env: dict[str, str],
              preexec: Callable[[], None] | None) -> ForkedProcess:
    """Fork a child that runs ``role`` on ``config_path`` with ``env``, output to ``log_path``;
    ``preexec`` as for ``Popen`` (the lifeline)."""
    out = log_path.open("ab")
    devnull = os.open(os.devnull, os.O_RDONLY)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        out.close()
        os.close(devnull)
        return ForkedProcess(pid)
    code = 1
    try:  # the child: never return into the caller's stack
        os.setsid()
        for sig in (signal.SIGINT, signal.SIGTERM):  # the parent's handlers are not ours: a fresh process's
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        if preexec is not None:
            preexec()
        os.dup2(devnull, 0)
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        # fresh stream objects: a lock another thread of the parent held at fork stays held in ours
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        code = _child_main(role, config_path, env)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
