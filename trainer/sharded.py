"""A model's state across torch.distributed ranks, for the writers of checkpoints and
published weights (docs/design.md §15.80 Checkpoints with torch.distributed.checkpoint):
which rank this is, whether the model is sharded (FSDP2's DTensor parameters), its full
tensors gathered to rank 0, and rank 0's file work with its outcome shared by every rank.

Without a process group (a single trainer process, the default) every function here is a
no-op or today's behaviour: rank 0 of 1, no collective, the model's own state dict.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist

from rlstream.core.errors import RlstreamError

log = logging.getLogger(__name__)
T = TypeVar("T")
_GATHER_DTYPES: dict[str, torch.dtype] = {}  # ``gathered_as``: the dtypes full tensors come out in, by name


@contextlib.contextmanager
def gathered_as(dtypes: dict[str, torch.dtype]) -> Iterator[None]:
    """Inside the block, ``full_state_dict`` casts the tensors named in ``dtypes`` (a sharded
    model's float32 masters, to the dtypes the base model was stored in: what is published)."""
    global _GATHER_DTYPES
    previous, _GATHER_DTYPES = _GATHER_DTYPES, dtypes
    try:
        yield
    finally:
        _GATHER_DTYPES = previous


def in_group() -> bool:
    """Whether this process is one rank of a torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without a process group."""
    if in_group():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (``fully_shard``): its tensors are then
    pieces, and a full state dict is a collective every rank takes part in."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) tensors of a sharded ``model``, on CPU, by the names
    ``model.state_dict()`` gives them: a collective (every rank must call it, on the step's
    thread: collectives of one group run in one order on every rank). Rank 0 gets the
    tensors (new ones: later updates leave them alone); the other ranks None.

    A tied weight (the lm_head of a model with tie_word_embeddings) is gathered once per name,
    as two tensors; its names are made to share the first one again, so that
    ``save_pretrained`` drops the tied copy as it does for the unsharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank_world()[0] != 0:
        return None
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name and owner in state and name in state:
            state[name] = state[owner]
    cast: dict[int, torch.Tensor] = {}  # one cast per tensor: tied names stay one tensor
    for name, dtype in _GATHER_DTYPES.items():
        if name in state and state[name].dtype != dtype:
            key = id(state[name])
            if key not in cast:
                cast[key] = state[name].to(dtype)
            state[name] = cast[key]
    return state


def on_rank0(work: Callable[[], T]) -> T | None:
    """``work()`` on rank 0 alone (writing files every rank's data went into), then its outcome
    shared: an error there is raised on every rank (rank 0's own exception there, an
    RlstreamError naming it on the others), so no rank goes on to a collective rank 0 gave
    up before. Returns ``work()``'s result on rank 0, None on the others; without a process
    group it is just ``work()``."""
    rank, world = rank_world()
    result, error = None, None
    if rank == 0:
        try:
            result = work()
        except BaseException as exc:  # shared below, then raised as it was
            error = exc
    if world > 1:
        outcome = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(outcome, src=0)
        if rank != 0 and outcome[0] is not None:
            raise RlstreamError(f"rank 0 failed: {outcome[0]}")
    if error is not None:
        raise error
    return result


def together(work: Callable[[], None]) -> None:
    """``work()`` on every rank (each writing its own file), then every rank's outcome shared:
    an error on any rank is raised on every rank, so none goes on without the others. Without
    a process group it is just ``work()``."""
    rank, world = rank_world()
    error = None
    try:
        work()
    except BaseException as exc:  # shared below, then raised as it was
        error = exc
    if world > 1:
        outcomes: list[str | None] = [None] * world
        dist.all_gather_object(outcomes, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, what) for r, what in enumerate(outcomes) if what is not None]
        if error is None and failed:
            raise RlstreamError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    if error is not None:
        raise error


class StateModel:
    """What ``write_model_dir`` saves from a gathered state dict: ``model``'s
    ``save_pretrained`` (config, generation config, tied weights dropped as usual) with
    ``state`` as its weights, so the directory is the one the unsharded model writes."""

    def __init__(self, model, state: dict[str, torch.Tensor]):
        self.model, self.state = model, state

    def parameters(self):  # the non-finite guard looks at what is written
        return iter(self.state.values())

    def save_pretrained(self, directory) -> None:
        self.model.save_pretrained(directory, state_dict=self.state)
