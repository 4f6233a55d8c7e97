"""The trainer's ranks (torch.distributed): the process group of a trainer launched under
torchrun, the collectives its step needs (sums, agreements), each rank's share of a batch's
rows, and the sharding of its models with FSDP2 (docs/design.md §15.81 Exact steps across
trainer ranks).

One process (``SINGLE``, what ``init_ranks`` returns outside torchrun) is the trainer as it
has always been: no process group, no collective, no sharding; every helper below is then
the identity, and the step's code path and numbers are unchanged.

With several ranks every rank holds the batch's lengths (and, for now, the whole batch), takes
its share of each minibatch's rows (``shares_of``: balanced by Σ L², a deterministic function of
the lengths, so every rank computes every share without asking), and runs the same number of
forwards and backwards as every other (FSDP's all-gathers and reduce-scatters are collectives:
a rank that runs one forward more waits forever). The minibatch's normaliser is the sum of the
ranks' counts, and FSDP's reduction sums gradients without dividing them, so the accumulated
gradient is the one-process gradient with the additions in another order.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from rlstream.core.errors import RlstreamError
from rlstream.trainer.losses import denominator_of, loss_denominator

log = logging.getLogger(__name__)
T = TypeVar("T")

# Long enough that a loaded machine (or a rank still compiling, loading weights, or reading a big
# batch) cannot trip it, short enough that a dead rank does not hang the others for good: the
# collectives' own default (10 min for gloo, 10 for nccl) is the same order.
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Ranks:
    """This process's place among the trainer's ranks. ``device``: where the collectives'
    tensors live (the CPU for gloo, this rank's GPU for nccl); ``mesh``: the 1-D device mesh
    FSDP shards over (None in one process)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object | None = None  # torch.distributed.device_mesh.DeviceMesh

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """The sums over the ranks of ``values`` (the same length on every rank), in float64:
        token counts stay exact integers, metric sums keep their digits."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_max(self, values: Sequence[int]) -> list[int]:
        """The elementwise maxima over the ranks of ``values``."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def all_min(self, value: int) -> int:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def all_agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on every rank: one decision (a minibatch is
        finite, the weights are) that every rank acts on alike."""
        return bool(self.all_min(int(flag)))

    def from_rank0(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (plain data: names, dtypes, digests); in one process,
        ``value`` itself."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def denominator(self, mask_B_T: torch.Tensor, normalization: str) -> float:
        """The minibatch's normaliser (``losses.loss_denominator``) from this rank's rows' mask:
        the ranks' counts of active tokens and of sequences with one, summed. Every rank then
        divides its loss sum by the whole minibatch's count, as one process does."""
        if not self.distributed:
            return loss_denominator(mask_B_T, normalization)
        mask_B_T = mask_B_T != 0
        tokens, sequences = self.all_sum(torch.stack([mask_B_T.sum(), mask_B_T.any(-1).sum()]).tolist())
        return denominator_of(int(tokens), int(sequences), normalization)

    def share(self, lengths_B: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows among ``rows`` (indices into the batch, ``lengths_B`` its rows'
        lengths): ``rows`` itself in one process."""
        if not self.distributed:
            return rows
        return rows[shares_of(lengths_B[rows], self.world)[self.rank]]

    def sync_gradients(self, model: torch.nn.Module, sync: bool) -> None:
        """Whether the next backward reduce-scatters the gradients (the last micro-batch of a
        step) or keeps accumulating them unsharded on this rank (every earlier one)."""
        if self.distributed:
            model.set_requires_gradient_sync(sync)


SINGLE = Ranks()


def backend_for(device: torch.device) -> str:
    """nccl between GPUs, gloo between CPU processes: chosen from the trainer's device."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_ranks(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """The ranks torchrun started this process among (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT`` in the environment): the process group joined with
    ``timeout_s`` on every collective, and the device mesh FSDP shards over. Outside torchrun,
    or with a world of one, ``SINGLE`` on ``device``: no process group at all."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(device=device)
    from torch.distributed.device_mesh import init_device_mesh

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":  # one GPU per rank, this node's LOCAL_RANK-th
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = backend_for(device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    mesh = init_device_mesh(device.type, (world,))
    log.info("trainer rank %d of %d (%s, %s, collectives time out after %.0f s)", rank, world, backend, device,
             timeout_s)
    return Ranks(rank, world, device, mesh)


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that waited ``trainer.collective_timeout`` for another rank:
    gloo raises it in the waiting rank ("Timed out waiting <ms> for recv/send operation"), nccl
    with blocking waits a DistBackendError ("... timed out ..."; its watchdog otherwise aborts the
    process by itself, with its own log line)."""
    return isinstance(exc, RuntimeError) and "timed out" in str(exc).lower()


def timeout_reason(timeout_s: float, exc: BaseException) -> str:
    rank = os.environ.get("RANK", "0")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return (f"trainer rank {rank}: a collective of the step waited trainer.collective_timeout ({timeout_s:.0f} s) "
            f"for another rank, which never joined it ({first}): that rank hangs (see its last log lines; "
            "py-spy dump --pid shows where) or is slower than the bound. The trainer's ranks stop; `rlstream up` "
            "starts a new group, which resumes from the last commit. If the ranks are only slow (a loaded "
            "machine, long batches, a large checkpoint or gather), raise trainer.collective_timeout")


@contextlib.contextmanager
def collectives_bounded(timeout_s: float) -> Iterator[None]:
    """Inside the block, a collective that timed out (``timed_out``) ends this rank with the
    reason, logged and raised as an RlstreamError (the process exits non-zero, torchrun's agent
    ends the other ranks and exits non-zero in turn): a rank that hangs in a collective costs
    the group ``timeout_s``, not forever (docs/design.md §15.82 Rank 0 speaks for the trainer's
    ranks)."""
    try:
        yield
    except RuntimeError as exc:
        if not timed_out(exc):
            raise
        reason = timeout_reason(timeout_s, exc)
        log.error("%s", reason)
        raise RlstreamError(reason) from exc


def close(ranks: Ranks) -> None:
    """Tear the process group down once every rank is done with it: without the barrier a rank
    that finished first closes its sockets under a peer still completing the last collective
    (seen as a rank aborting, "terminate called without an active exception", in the suite).
    The barrier's own work is dropped by a gloo thread a moment later: the process must then end
    without the interpreter's finalization (``rlstream.torchrun.end_rank``, docs/design.md §15.90
    A rank ends without the interpreter's finalization)."""
    if ranks.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shares_of(lengths_B: torch.Tensor, world: int) -> list[torch.Tensor]:
    """The rows (indices into ``lengths_B``) each of ``world`` ranks trains: balanced by the
    sum of L² (attention's cost grows with the square of a row's length; TRL's planner),
    greedily, longest row first, each to the rank with the least cost so far (then the fewest
    rows, then the lowest rank). Deterministic in the lengths alone; each share in row order.
    Every rank gets a row when there are at least ``world``: the first ``world`` rows go to the
    ranks that have none."""
    return assign(lengths_B, [0] * world)[0]


def assign(lengths_B: torch.Tensor, loads: Sequence[int]) -> tuple[list[torch.Tensor], list[int]]:
    """``shares_of`` on top of the ranks' ``loads`` (Σ L² of the rows they already hold: a
    streamed step assigns its groups as they arrive): (each rank's new rows, the new loads)."""
    loads, counts = list(loads), [0] * len(loads)
    order = sorted(range(len(lengths_B)), key=lambda i: -int(lengths_B[i]))  # stable: ties keep row order
    shares: list[list[int]] = [[] for _ in loads]
    for i in order:
        r = min(range(len(loads)), key=lambda r: (loads[r], counts[r], r))
        shares[r].append(i)
        loads[r] += int(lengths_B[i]) ** 2
        counts[r] += 1
    return [torch.tensor(sorted(s), dtype=torch.long) for s in shares], loads


def even_out(micro: list[torch.Tensor], lengths_B: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``micro`` (a rank's micro-batches, longest rows first) made exactly ``count`` forwards,
    the number the most loaded rank runs: the micro-batch holding the most padded tokens is
    split in two (each half fits the budget its whole did) while one has two rows; then
    placeholders (empty row sets: a forward and backward of nothing, see ``micro_batch``)."""
    micro = list(micro)
    while len(micro) < count:
        splittable = [j for j, rows in enumerate(micro) if len(rows) > 1]
        if not splittable:
            break
        j = max(splittable, key=lambda j: (len(micro[j]) * int(lengths_B[micro[j]].max()), -j))
        half = (len(micro[j]) + 1) // 2
        micro[j:j + 1] = [micro[j][:half], micro[j][half:]]
    return micro + [torch.zeros(0, dtype=torch.long)] * (count - len(micro))


def shard(model: torch.nn.Module, ranks: Ranks, compute: torch.dtype = torch.float32) -> torch.nn.Module:
    """``model`` sharded across the ranks with FSDP2 (``fully_shard``): each transformer block
    (transformers' ``GradientCheckpointingLayer``s: every decoder layer), then the root (the
    embeddings, the final norm, the head). A peft (LoRA) model shards the same way, its frozen
    base and its adapters together. Compute in ``compute`` (bfloat16, float16: gathered in it,
    gradients reduced in float32). Gradients are reduced by a plain sum (divide factor 1):
    the step's loss is already divided by the whole minibatch's normaliser, and FSDP's
    default mean would divide once more by the world size. The optimizer must be built after.

    Only rank 0's ``model`` holds weights (on the CPU); every other rank's is the same modules
    on the meta device (``policy_model.load_base``). Once sharded, each rank's shards are
    allocated on its device and filled from rank 0's tensors, one tensor at a time
    (``set_model_state_dict``'s broadcast from rank 0), and every buffer, the non-persistent
    ones (rotary frequencies) included, is broadcast from rank 0 (docs/design.md §15.94 Only
    rank 0 reads the weights; the others build the model on the meta device). Nothing else may
    hold rank 0's unsharded parameters (``fully_shard`` moves each whole to the device, and a
    reference would keep it there). In one process: ``model`` unchanged."""
    if not ranks.distributed:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    full = model.state_dict() if ranks.rank == 0 else {}  # rank 0's whole tensors, alive until broadcast
    policy = MixedPrecisionPolicy() if compute == torch.float32 else MixedPrecisionPolicy(
        param_dtype=compute, reduce_dtype=torch.float32)
    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for block in blocks:
        fully_shard(block, mesh=ranks.mesh, mp_policy=policy)
    fully_shard(model, mesh=ranks.mesh, mp_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # SUM in the collective itself: no divide, no pre-scale
    if ranks.rank != 0:
        model.to_empty(device=ranks.device)  # the meta skeleton's shards and buffers, allocated (values below)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)  # every buffer: a non-persistent one is in no state dict
    del full
    log.debug("sharded %d blocks and the root over %d ranks, filled from rank 0", len(blocks), ranks.world)
    return model


def broadcast_dtypes(model: torch.nn.Module | None, ranks: Ranks) -> dict[str, torch.dtype]:
    """Rank 0's ``model``'s dtype of each parameter and buffer, by name, on every rank (the
    other ranks pass None: they have no weights yet)."""
    return ranks.from_rank0(None if model is None else {name: t.dtype for name, t in
                                                        [*model.named_parameters(), *model.named_buffers()]})


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t
