"""Starting a trainer of several ranks: ``rlstream trainer`` (and ``rlstream replay``) with
``trainer.nproc_per_node * trainer.nnodes > 1`` replace themselves (``exec``) with torchrun
(``python -m torch.distributed.run``), which starts one rank per process, each running the
same ``rlstream`` command (docs/scaling-trainer.md; docs/design.md §15.82 Rank 0 speaks for the
trainer's ranks).

``exec``, not a child: the process ``rlstream up`` started and supervises *is* torchrun's
agent, with the same pid and the same death signal (PDEATHSIG survives exec), so stopping or
losing ``up`` stops the agent, the agent stops its ranks, and a rank that dies makes the agent
end the others and exit non-zero, which ``up`` sees as the trainer's crash and restarts (the
new trainer resumes exactly). torchrun's own restarts are off (``--max-restarts 0``): one
supervisor, one restart budget. Each rank watches the agent (``watch_agent``): torchrun starts
ranks in their own sessions and without a death signal, so an agent killed by SIGKILL would
otherwise leave them running.

The backend is not chosen here: each rank's ``trainer.ranks.init_ranks`` picks gloo or nccl
from the trainer's device. This module imports neither torch nor the trainer.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import NoReturn

from rlstream.core.config import TrainerConfig
from rlstream.core.lifeline import watch_parent

log = logging.getLogger(__name__)
# Set by torchrun in every rank's environment (and by nothing else rlstream starts).
RANK_ENV = ("LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def under_torchrun() -> bool:
    """Whether this process is one of torchrun's ranks."""
    return all(name in os.environ for name in RANK_ENV)


def rank() -> int:
    """This process's global rank (torchrun's ``RANK``): 0 outside torchrun."""
    return int(os.environ.get("RANK", "0")) if under_torchrun() else 0


def launches(trainer: TrainerConfig) -> bool:
    """Whether this trainer runs as several ranks that torchrun must start (and we are not one yet)."""
    return trainer.world_size > 1 and not under_torchrun()


def torchrun_args(trainer: TrainerConfig, run_id: str | None) -> list[str]:
    """torchrun's options for ``trainer``: one node (``--standalone``: a rendezvous on a free local
    port), several nodes meeting at ``rdzv_endpoint`` (torchrun's c10d rendezvous, ``rdzv_id`` or
    the run id naming this trainer), or, with ``node_rank``, a static rendezvous whose node 0
    (which holds rank 0) listens at ``rdzv_endpoint``."""
    args = ["--nnodes", str(trainer.nnodes), "--nproc-per-node", str(trainer.nproc_per_node), "--max-restarts", "0"]
    if trainer.nnodes == 1:
        return ["--standalone", *args]
    assert trainer.rdzv_endpoint is not None  # TrainerConfig requires it with nnodes > 1
    if trainer.node_rank is not None:
        host, port = trainer.rdzv_endpoint.rsplit(":", 1)
        return [*args, "--node-rank", str(trainer.node_rank), "--master-addr", host.strip("[]"), "--master-port",
                port]
    return [*args, "--rdzv-backend", "c10d", "--rdzv-endpoint", trainer.rdzv_endpoint, "--rdzv-id",
            trainer.rdzv_id or run_id or "rlstream"]


def command(trainer: TrainerConfig, run_id: str | None, argv: list[str]) -> list[str]:
    """The torchrun command line whose every rank runs ``rlstream <argv>``."""
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args(trainer, run_id), "-m", "rlstream.cli",
            *argv]


def rank_env() -> dict[str, str]:
    """The agent's (and so its ranks') environment: ours, and no working directory in front of the
    import path (``PYTHONSAFEPATH``, what ``python -P`` does for a child of ``up``: a source
    checkout in the working directory must not shadow the installed package; the CLI appends the
    working directory itself, for user modules)."""
    return {**os.environ, "PYTHONSAFEPATH": "1"}


def exec_ranks(trainer: TrainerConfig, run_id: str | None, argv: list[str]) -> None:
    """Become torchrun's agent for ``rlstream <argv>`` (never returns)."""
    cmd = command(trainer, run_id, argv)
    log.info("trainer: %d ranks (%d per node on %d node(s)) under torchrun: %s", trainer.world_size,
             trainer.nproc_per_node, trainer.nnodes, " ".join(cmd[1:]))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execve(sys.executable, cmd, rank_env())


def end_rank(code: int) -> NoReturn:
    """End a rank's process with ``code`` once its work is done and its process group closed, without
    the interpreter's finalization (``os._exit``, logging and stdio flushed first).

    Why: gloo's worker threads drop a collective's work object a moment *after* the rank saw it
    complete, and the last one (``close``'s barrier) holds a tensor with a Python object. When that
    drop falls inside ``Py_FinalizeEx``, the worker thread asks for the GIL after it is gone, which
    (Python < 3.14) ends the thread with ``pthread_exit`` through a ``noexcept`` destructor:
    ``std::terminate``, "terminate called without an active exception", SIGABRT, and torchrun
    reports a finished run as failed (seen in 2 of 36 runs of tests/unit/ranks_cases.py; a
    core dump showed the worker in ``~AsyncBarrierWork`` and the main thread in ``Py_FinalizeEx``).
    Skipping finalization skips ``atexit`` handlers: the trainer joins its weight writer and
    finishes wandb however its run ends, before it returns; the metrics file is written unbuffered,
    Redis synchronously, and its other threads are daemons (the lease's renewal, the agent watch)."""
    try:
        logging.shutdown()
    except Exception:  # noqa: BLE001 - a handler that cannot flush must not change the exit code
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (the agent gone) or stream: the code still goes out
            pass
    os._exit(code)


def watch_agent() -> threading.Thread:
    """In a rank: exit once torchrun's agent (our parent) is gone, however it died."""
    return watch_parent(os.getppid())
