"""The weight writer's file work in a process of its own (docs/design.md §15.99 The weights are
written by a process of their own): the weights file of each version, its directory linked,
fsynced, sealed and renamed into place (``weights.write_linked_dir``), and the prune of old
versions, done by a spawned child from tensors in shared memory that the step's thread fills.

Why a process and not the writer's thread alone: the same work on a thread of the trainer's
process slows a torch step running beside it about four times as much as in a process of its
own (``bench/writer_interference.py``: +3.05 ms a step against +0.68 ms on the built-in model,
the writer's CPU the same), though neither holds the GIL for long. So ``WeightSync``'s thread
keeps what needs the trainer's objects (the lease, the Redis client, the publish) and hands the
files to this process; it waits for each answer on a pipe, which costs the step nothing.

The child touches only what it is sent: paths, the template's bytes, the shared tensors. It
dies with the trainer (``PR_SET_PDEATHSIG`` on Linux, else at the pipe's end), so a killed
trainer leaves no writer behind to finish a version another trainer may be writing; a
directory it left half written is a temporary one, which the next write of that version
removes. Its errors come back (``as_sent``), raised on the writer's thread as its own would be,
and from there on the step's thread at its next ``wait``.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from rlstream.core import weights
from rlstream.core.errors import RlstreamError

log = logging.getLogger(__name__)
START_BOUND_S = 120.0  # the child's imports (torch) on a loaded machine: ~1 s here
POLL_S = 1.0  # how often a wait for an answer looks whether the child is still alive
PR_SET_PDEATHSIG = 1


class WriterProcess:
    """A spawned child that writes versions from ``tensors`` (in shared memory: the step's thread
    copies each version's weights into them, the child reads them) with ``template``'s files.
    One caller at a time (the writer's thread); ``close`` at the trainer's end."""

    def __init__(self, template: Any, snapshot: dict[str, torch.Tensor]):
        """Start the child on a copy of ``snapshot`` in shared memory (``tensors``: each later
        snapshot is copied into them; a new copy, since a snapshot's tensor may be the model's own,
        a LoRA policy's frozen base). Raises when there is no room for it or the child does not
        answer within ``START_BOUND_S``."""
        import torch.multiprocessing  # noqa: F401  (registers the reductions that hand tensors over as shared memory)

        shared_memory_room(sum(t.numel() * t.element_size() for t in snapshot.values()))
        self.tensors = {k: torch.empty_like(t, device="cpu").share_memory_() for k, t in snapshot.items()}
        for k, t in snapshot.items():
            self.tensors[k].copy_(t)
        context = multiprocessing.get_context("spawn")  # a fork would copy the trainer's threads' locks
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=serve, args=(child_end, template, self.tensors, os.getpid()),
                                       name="rlstream-weight-writer", daemon=True)
        with main_hidden():
            self.process.start()
        child_end.close()
        try:
            self.call(("ready",), bound_s=START_BOUND_S)
        except BaseException:
            # the writer's thread writes the files instead (WeightSync.start_writer): a child that would answer
            # later must not run beside it for the rest of the run, holding its map of the shared weights
            self.kill()
            raise

    def write(self, final: Path, version: int, source: Path | None,
              known: dict[str, weights.FileStamp]) -> tuple[str, int, bool, dict[str, weights.FileStamp]]:
        """``DirTemplate.write_dir`` of ``final`` in the child: (digest, bytes, links, the new ``known``)."""
        return self.call(("write", final, version, source, known))

    def prune(self, run_dir: Path, version: int, keep: int) -> None:
        self.call(("prune", run_dir, version, keep))

    def call(self, request: tuple, bound_s: float | None = None) -> Any:
        """Send ``request`` and wait for its answer: the result, or the child's exception raised
        here. A child that died (or, with ``bound_s``, did not answer in time) is an error
        naming it; the caller's own bound (``WRITE_BOUND_S``) covers a hung write."""
        try:
            self.conn.send(request)
            waited = 0.0
            while not self.conn.poll(POLL_S):
                waited += POLL_S
                if not self.process.is_alive() or (bound_s is not None and waited >= bound_s):
                    raise EOFError
            status, value = self.conn.recv()
        except (EOFError, OSError) as exc:
            self.process.join(POLL_S)  # a pipe can break before the dead child is reaped: its exit code
            code = self.process.exitcode
            what = "did not answer" if code is None else f"exited with code {code}"
            then = "" if request[0] == "ready" else "; the trainer stops, and its restart writes the version again"
            raise RlstreamError(f"the weight writer process (pid {self.process.pid}) {what} ({type(exc).__name__})"
                                f"{then}") from None
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        """The child ends at the pipe's end; one that does not within 10 s is killed."""
        self.conn.close()
        self.process.join(10)
        if self.process.is_alive():
            self.kill()

    def kill(self) -> None:
        """End the child now, whatever it is doing (a write it leaves half done is a temporary directory)."""
        self.conn.close()
        self.process.kill()
        self.process.join(10)


def shared_memory_room(nbytes: int, where: str = "/dev/shm") -> None:
    """Raise unless ``where`` (torch's shared memory on Linux) has room for ``nbytes`` and a
    margin: a shared tensor that outgrows it is not refused when made but kills the process
    with SIGBUS when written (a container's /dev/shm is 64 MB unless given more)."""
    if Path(where).is_dir():
        free = shutil.disk_usage(where).free
        if free < nbytes * 1.1:
            raise RlstreamError(f"{where} has {free >> 20} MiB free, a snapshot of the weights needs "
                                f"{nbytes >> 20} MiB (give the container more shared memory: docker --shm-size)")


@contextlib.contextmanager
def main_hidden() -> Iterator[None]:
    """A spawned child runs the parent's ``__main__`` again before its target unless told of none:
    a user's script that starts a run at its top level, without ``if __name__ == "__main__"``,
    would start a second run in the writer. Shown a bare ``__main__`` while it starts, the child
    imports only this module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def serve(conn: Any, template: Any, tensors: dict[str, torch.Tensor], parent: int) -> None:
    """The child: one request after another until the pipe ends (the trainer closed it, or died)."""
    from rlstream.trainer.policy_model import prune_weights

    die_with(parent)
    # Ctrl-C in a terminal reaches the whole foreground process group: the trainer's KeyboardInterrupt then
    # finishes the version in flight (WeightSync.close), which this process must still write. It ends at the
    # pipe's end or with the trainer (SIGTERM stays: multiprocessing's exit ends a daemon child with it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # safetensors writes; nothing here computes
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        try:
            kind, *args = request
            if kind == "write":
                final, version, source, known = args
                answer: Any = (*template.write_dir(final, tensors, version, source, known), known)
            elif kind == "prune":
                answer = prune_weights(*args)
            else:
                answer = None  # "ready"
            conn.send(("ok", answer))
        except Exception as exc:  # the caller raises it as its own
            conn.send(("error", as_sent(exc)))


def die_with(parent: int) -> None:
    """Be killed when the trainer dies (Linux); elsewhere the pipe's end stops the loop between
    versions. Linux sends the signal when the *thread* that started the child ends: the step's
    thread, which is the trainer's main thread (a trainer stepped from a thread that ends before
    it does would lose its writer, and stop at its next write with why)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError) as exc:  # no prctl: the pipe's end stops the loop
            log.debug("PR_SET_PDEATHSIG unavailable: %s", exc)
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(0)


def as_sent(exc: Exception) -> Exception:
    """What the child sends back for ``exc``: rlstream's own errors (``DiskFull`` keeps its exit
    code) and the OS's (a path, an errno) as they are, both rebuilt from their message alone on
    the other side; any other as an ``RlstreamError`` naming it (a library's exception need not
    survive the pipe)."""
    return exc if isinstance(exc, (RlstreamError, OSError)) else RlstreamError(f"{type(exc).__name__}: {exc}")
