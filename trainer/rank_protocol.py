"""Rank 0 speaks for the trainer's ranks (docs/design.md §15.82 Rank 0 speaks for the trainer's
ranks): it alone holds a Redis connection and runs the run's protocol (the lease, the reads and
acks, the commit, the events, the published weights, metrics.jsonl); before each piece of work
that every rank must do together (a step on a batch, a streamed chunk, a weights gather, a
checkpoint, a load, an export) it sends the other ranks a command, with the batch when there is
one, and they do their part of it. ``Channel`` carries the commands; ``follow`` is what a rank
other than 0 runs until rank 0 says stop.

The commands travel on a process group of their own (gloo, on the CPU, whatever the step's
backend): a rank waits there for as long as rank 0 waits for rollouts or for the lease, which
no collective timeout can bound, while the step's own collectives keep
``trainer.collective_timeout``. A rank 0 that dies closes its connections, so a waiting rank
fails at once rather than at the timeout (and torchrun ends the others anyway).
"""
from __future__ import annotations

import datetime
import logging
from typing import Any

import torch.distributed as dist

from rlstream.trainer.ranks import Ranks

log = logging.getLogger(__name__)
# How long a rank waits for rank 0's next command: rank 0 may stand by for the lease or wait for
# rollouts for hours; a dead rank 0 ends the wait at once (its sockets close).
COMMAND_WAIT = datetime.timedelta(days=7)

# The commands, in the order a run sends them.
LOAD, OPTIMIZE, STREAM, STREAM_ADD, WEIGHTS, WRITE_WEIGHTS, CHECKPOINT, EXPORT, STOP = (
    "load", "optimize", "stream", "stream_add", "weights", "write_weights", "checkpoint", "export", "stop")


class Channel:
    """Rank 0's commands to the other ranks (nothing at all in one process)."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        # Every rank creates the group (a collective), in __init__, in the same order.
        self.group = dist.new_group(backend="gloo", timeout=COMMAND_WAIT) if ranks.distributed else None
        self.sent = 0

    def send(self, op: str, *args: Any) -> None:
        """Rank 0: every other rank does ``op`` with ``args`` next (pickled: plain data, CPU tensors)."""
        if self.group is None:
            return
        assert self.ranks.rank == 0, "only rank 0 sends commands"
        dist.broadcast_object_list([(op, args)], src=0, group=self.group)
        self.sent += 1

    def receive(self) -> tuple[str, tuple]:
        """A rank other than 0: the next command."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        op, args = box[0]
        return op, args


def follow(trainer) -> int:
    """A rank other than 0 (``trainer``: its ``Trainer``, without Redis): do what rank 0 says, in
    its order, until it says stop; the steps taken."""
    streamed = None
    while True:
        op, args = trainer.channel.receive()
        log.debug("rank %d: %s", trainer.ranks.rank, op)
        if op == STOP:
            return trainer.step
        if op == OPTIMIZE:
            groups, lr, is_streamed = args
            trainer.update(groups, lr, streamed if is_streamed else None)
            streamed = None
        elif op == STREAM:
            streamed = trainer.streaming_step()
        elif op == STREAM_ADD:
            streamed.add(args[0])
        elif op in (WEIGHTS, WRITE_WEIGHTS):
            trainer.gather_weights(args[0])
        elif op == CHECKPOINT:
            trainer.save_train_state(args[0], fold=None)
        elif op == LOAD:
            trainer.load_train_state(args[0])
        elif op == EXPORT:
            trainer.export()
        else:
            raise RuntimeError(f"rank {trainer.ranks.rank}: unknown command {op!r} from rank 0")
