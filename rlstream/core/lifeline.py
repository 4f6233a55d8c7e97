"""Child processes that die with their supervisor (issue "Reliability II" item 10).

``rlstream up`` starts its children (producer, workers, trainer) and the embedded
redis-server in their own sessions, so that a terminal's Ctrl-C reaches only ``up``; a
SIGKILLed ``up`` therefore used to leave them all running. Two mechanisms:

- ``die_with_parent(sig)``: a ``preexec_fn`` for ``subprocess.Popen`` that asks Linux to
  send ``sig`` to the child when its parent dies (``prctl(PR_SET_PDEATHSIG)``). It runs
  between fork and exec and survives exec, so it also covers redis-server, which cannot
  set it itself. Linux sends the signal when the parent *thread* that forked the child
  exits: ``up`` forks every child from its main thread.
- ``watch_parent(pid)``: a daemon thread in a Python child that kills the process once its
  parent is no longer ``pid`` (it was re-parented: the supervisor died). It also works
  where prctl is absent (macOS); ``rlstream up`` passes its pid in ``SUPERVISOR_ENV``.

And a SIGTERM that stops a process of the run (``rlstream up`` itself, or a trainer it stops)
unwinds like Ctrl-C (``raise_interrupt``), so that every ``finally`` runs.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Callable

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SUPERVISOR_ENV = "RLSTREAM_SUPERVISOR_PID"
WATCH_EVERY_S = 1.0


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` making the child receive ``sig`` when this process dies, or None
    where prctl is unavailable. Resolved here, in the parent: the child only makes the call."""
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: nobody will signal us
            os.kill(os.getpid(), sig)

    return preexec


def watch_parent(supervisor_pid: int, sig: int = signal.SIGKILL, every_s: float = WATCH_EVERY_S) -> threading.Thread:
    """Kill this process with ``sig`` once its parent is no longer ``supervisor_pid``."""

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            threading.Event().wait(every_s)
        log.error("supervisor (pid %d) is gone: exiting", supervisor_pid)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=watch, name="supervisor-watch", daemon=True)
    thread.start()
    return thread


def watch_supervisor_from_env() -> threading.Thread | None:
    """In a child of ``rlstream up``: start ``watch_parent`` for the pid ``up`` passed."""
    value = os.environ.get(SUPERVISOR_ENV, "")
    if not value.isdigit():
        return None
    return watch_parent(int(value))


def raise_interrupt(signum, frame) -> None:
    """A SIGTERM handler: raise ``KeyboardInterrupt``, as Ctrl-C does (a SIGTERM's default
    action would end the process without running a single ``finally``)."""
    raise KeyboardInterrupt
