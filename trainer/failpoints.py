"""Failpoints for the crash tests: ``RLSTREAM_FAULT="<point>:<step>[,<point>:<step>...]"`` makes
the trainer crash at a named point of a given step, so that the e2e tests can check recovery
from exactly there (docs/design.md §10 Failure semantics). The points:

- ``after_commit:<step>``: the trainer SIGKILLs itself right after the step's commit, before
  it publishes the weights (``trainer``);
- ``mid_archive:<step>``: the trainer SIGKILLs itself with an archive segment half written,
  before its rename (``retention``);
- ``after_trim:<step>``: the run's embedded redis-server is SIGKILLed right after the trim
  (``retention``);
- ``hang_before_backward@<rank>:<step>``: trainer rank ``<rank>`` sleeps for good after the
  step's first forward, before its backward (``trainer``): the other ranks wait in the step's
  next collective until ``trainer.collective_timeout`` ends the group (docs/design.md §15.82
  Rank 0 speaks for the trainer's ranks).

Each logs one ``failpoint ...`` line before it acts (the tests wait for it).
Unset, nothing here does anything.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Mapping

if TYPE_CHECKING:  # the retention's and the launcher's processes never import torch for this
    import torch

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


@contextlib.contextmanager
def hang_before_backward(model: torch.nn.Module, step: int, rank: int) -> Iterator[None]:
    """Inside the block, ``model``'s first forward never returns on ``rank`` when
    ``hang_before_backward@<rank>:<step>`` is armed (a rank stuck mid-step: its forward's
    collectives done, its backward's never joined)."""
    point = f"hang_before_backward@{rank}"
    if not armed(point, step):
        yield
        return

    def hang(*_) -> None:
        log.warning("failpoint %s:%d: this rank sleeps for good", point, step)
        while True:
            time.sleep(3600)

    handle = model.register_forward_hook(hang)
    try:
        yield
    finally:
        handle.remove()


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
