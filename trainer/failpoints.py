"""Failpoints for the crash tests: ``RLSTREAM_FAULT="<point>:<step>[,<point>:<step>...]"`` makes
the trainer crash at a named point of a given step, so that the e2e tests can check recovery
from exactly there (docs/design.md §10 Failure semantics). The points:

- ``after_commit:<step>``: the trainer SIGKILLs itself right after the step's commit, before
  it publishes the weights (``trainer``);
- ``mid_archive:<step>``: the trainer SIGKILLs itself with an archive segment half written,
  before its rename (``retention``);
- ``after_trim:<step>``: the run's embedded redis-server is SIGKILLed right after the trim
  (``retention``).

Each logs one ``failpoint ...: SIGKILL`` line before it acts (the e2e tests wait for it).
Unset, nothing here does anything.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Iterator, Mapping

log = logging.getLogger(__name__)
FAULT_ENV = "RLSTREAM_FAULT"


def armed(point: str, step: int, environ: Mapping[str, str] | None = None) -> bool:
    """True when ``RLSTREAM_FAULT`` names ``point`` at ``step``."""
    spec = (os.environ if environ is None else environ).get(FAULT_ENV, "")
    return f"{point}:{step}" in (part.strip() for part in spec.split(","))


def kill_self(point: str, step: int) -> None:
    """SIGKILL this process when ``point`` is armed at ``step``."""
    if armed(point, step):
        log.warning("failpoint %s:%d: SIGKILL", point, step)
        os.kill(os.getpid(), signal.SIGKILL)


def die_mid_write(entries: Iterator) -> Iterator:
    """``entries``, with this process SIGKILLed once the first is through (``mid_archive``:
    part of a segment written, before its rename)."""
    for i, entry in enumerate(entries):
        if i == 1:
            log.warning("failpoint mid_archive: SIGKILL")
            os.kill(os.getpid(), signal.SIGKILL)
        yield entry


def kill_embedded_redis(run_dir: Path) -> None:
    """SIGKILL the run's embedded redis-server (``after_trim``); nothing when the run has none."""
    try:
        pid = int((run_dir / "redis" / "pid").read_text())
    except (OSError, ValueError):
        return
    log.warning("failpoint after_trim: SIGKILL redis-server %d", pid)
    os.kill(pid, signal.SIGKILL)
