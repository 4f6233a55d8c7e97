"""Group assembly (dedup by ``sample_id``) and collation into padded, aligned tensors.

Alignment: a causal LM yields N-1 next-token logprobs for N tokens; the worker's
behaviour logprobs have N entries with the first undefined, so both the behaviour
logprobs and the loss mask are aligned by dropping position 0 (``[:, 1:]``).
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from rlstream.core.messages import DeadLetter, RolloutRecord


@dataclass
class Group:
    group_id: str
    size: int
    members: dict[str, tuple[str, RolloutRecord]] = field(default_factory=dict)  # sample_id -> (entry, sample)
    advantages_G: torch.Tensor | None = None  # set by the trainer once the group is complete
    # Per-token advantages (advantage = "igpo"): one (len(tokens) - 1,) tensor per sample, in ``samples``'
    # order, aligned to the targets; None = each sample's advantages_G entry on every token
    # (docs/design.md §15.84 Per-token advantages: a turn's tokens carry its advantage).
    token_advantages: list[torch.Tensor] | None = None
    first_seen: float = field(default_factory=time.monotonic)
    invalid: set[str] = field(default_factory=set)  # sample ids dead-lettered by the trainer's checks

    @property
    def complete(self) -> bool:
        return len(self.members) >= self.size

    @property
    def accounted_for(self) -> bool:
        """Every member arrived, valid or dead-lettered: nothing more is coming."""
        return len(self.invalid | set(self.members)) >= self.size

    @property
    def submit_version(self) -> int:
        """The version the producer admitted the group at (what the staleness bound counts from)."""
        return min(s.submit_version for s in self.samples) if self.members else 0

    @property
    def entry_ids(self) -> list[str]:
        return [e for e, _ in self.members.values()]

    @property
    def samples(self) -> list[RolloutRecord]:
        return [s for _, s in self.members.values()]

    @property
    def rewards_G(self) -> torch.Tensor:
        return torch.tensor([s.reward for s in self.samples], dtype=torch.float32)

    # What dynamic_filter_fn(group) sees: rewards and advantages as plain lists, and ``samples`` (the records).
    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    @property
    def advantages(self) -> list[float]:
        return [] if self.advantages_G is None else self.advantages_G.tolist()


class GroupAssembler:
    """Collects samples until their group is complete; duplicates (a re-delivered or
    re-dispatched sample, a group already settled) come back for acking, untrained."""

    def __init__(self) -> None:
        self.open: dict[str, Group] = {}
        # Groups already handed out: a re-run job (rq retry, or a dead worker's job re-queued)
        # re-delivers their samples before the commit marks them settled (then ``forget``).
        self.completed: set[str] = set()

    def add(self, entry_id: str, sample: RolloutRecord, settled: set[str]) -> tuple[Group | None, str | None]:
        """Returns (the group if this sample completed it, the entry id if a duplicate)."""
        if sample.group_id in settled or sample.group_id in self.completed:
            return None, entry_id
        group = self.open.setdefault(sample.group_id, Group(sample.group_id, sample.group_size))
        if sample.sample_id in group.members:
            return None, entry_id
        group.members[sample.sample_id] = (entry_id, sample)
        if group.complete:
            self.completed.add(sample.group_id)
            return self.open.pop(sample.group_id), None
        return None, None

    def add_invalid(self, sample: RolloutRecord | DeadLetter, settled: set[str]) -> None:
        """A member that was dead-lettered (e.g. a token outside the vocabulary): it counts
        towards settling its group, never towards training it. Either the decoded sample or
        its dead letter (both carry sample_id, group_id and group_size)."""
        if sample.group_id in settled or sample.group_id in self.completed:
            return
        group = self.open.setdefault(sample.group_id, Group(sample.group_id, sample.group_size))
        group.invalid.add(sample.sample_id)

    def forget(self, group_ids: Iterable[str]) -> None:
        """Groups now settled in the run's fold (trained or rejected): its own check covers their
        re-delivered samples from here on, so ``completed`` holds only groups in flight."""
        self.completed.difference_update(group_ids)

    def held_entry_ids(self) -> set[str]:
        return {e for g in self.open.values() for e in g.entry_ids}

    def pop_stale(self, max_age_s: float) -> list[Group]:
        """Incomplete groups older than ``max_age_s`` (a member was lost) or whose missing
        members were all dead-lettered: the trainer trains them if they are large enough,
        else rejects them."""
        now = time.monotonic()
        stale = [g for g in self.open.values() if now - g.first_seen > max_age_s or g.accounted_for]
        for g in stale:
            del self.open[g.group_id]
            self.completed.add(g.group_id)
        return stale


def take_oldest(ready: list[Group], n: int) -> tuple[list[Group], list[Group]]:
    """(the ``n`` groups admitted at the oldest version, the rest), each in arrival order.
    Taking groups in completion order would let a slow or re-dispatched group wait past
    the staleness bound (submit offset > O + 1) while younger ones train."""
    order = sorted(range(len(ready)), key=lambda i: ready[i].submit_version)  # stable: arrival breaks ties
    taken = set(order[:n])
    return [g for i, g in enumerate(ready) if i in taken], [g for i, g in enumerate(ready) if i not in taken]


def overdue_unseen(unseen: dict[str, float], noticed: list[str], now: float, limit_s: float,
                   caught_up_at: float) -> tuple[dict[str, float], list[str]]:
    """Sampled groups none of whose members has reached the buffer (``noticed``, each with the
    time ``unseen`` first noticed it; new ones start ``now``): (those still waiting, those
    waiting longer than ``limit_s`` with a read that caught up with the stream since, whose
    entries therefore never decoded)."""
    since = {gid: unseen.get(gid, now) for gid in noticed}
    overdue = [gid for gid, t in since.items() if now - t > limit_s and caught_up_at > t]
    return {gid: t for gid, t in since.items() if gid not in overdue}, overdue


@dataclass
class Batch:
    tokens_B_N: torch.Tensor  # long, right-padded
    attention_B_N: torch.Tensor  # 1 on real tokens
    inf_logprobs_B_T: torch.Tensor  # behaviour logprobs aligned to targets: T = N - 1 - first
    mask_B_T: torch.Tensor  # float, 1 on trained targets
    advantages_B: torch.Tensor
    # One advantage per target (IGPO's turns), used instead of advantages_B; None = advantages_B on every token.
    advantages_B_T: torch.Tensor | None = None
    # The (B, T) columns are the targets tokens_B_N[:, first + 1:]: a micro-batch leaves out the columns before
    # its first trained target (``micro_batch.rows_of``), whose logits no loss reads.
    first: int = 0

    @property
    def advantages(self) -> torch.Tensor:
        """What the loss takes: ``advantages_B_T`` when the batch has per-token advantages, else ``advantages_B``."""
        return self.advantages_B if self.advantages_B_T is None else self.advantages_B_T


def collate(samples: list[RolloutRecord], advantages_B: torch.Tensor, pad_id: int, device: torch.device,
            token_advantages: list[torch.Tensor | None] | None = None) -> Batch:
    """Right-padded (B, N) tensors of ``samples`` (equal-length arrays each, ``RolloutRecord``
    checks it). Each field's arrays are joined into one buffer and scattered into the real
    positions at once: read row by row, those are the samples' tokens in order. A handful of
    tensor ops whatever B (one slice assignment per sample and field cost ~3.5 ms at B = 256,
    bench/trainer_overhead.py).

    ``token_advantages`` (None: scalar advantages only, nothing more is built): per sample, its
    (len(tokens) - 1,) per-token advantages, or None for its ``advantages_B`` entry on every
    token; the batch then carries ``advantages_B_T``."""
    lengths_B = torch.tensor([len(s.tokens) for s in samples], dtype=torch.long)
    B, N = len(samples), int(lengths_B.max())
    real_B_N = torch.arange(N)[None, :] < lengths_B[:, None]
    tokens = torch.full((B, N), pad_id, dtype=torch.long)
    inf = torch.zeros((B, N), dtype=torch.float32)
    mask = torch.zeros((B, N), dtype=torch.float32)
    tokens[real_B_N] = _joined(samples, "tokens", torch.int32).long()
    inf[real_B_N] = _joined(samples, "logprobs", torch.float32)
    mask[real_B_N] = _joined(samples, "loss_mask", torch.uint8).float()
    adv_B_T = None if token_advantages is None else token_advantages_B_T(advantages_B, token_advantages, N - 1)
    return Batch(tokens.to(device), real_B_N.long().to(device), inf[:, 1:].to(device), mask[:, 1:].to(device),
                 advantages_B.to(device), None if adv_B_T is None else adv_B_T.to(device))


def token_advantages_B_T(advantages_B: torch.Tensor, token_advantages: list[torch.Tensor | None],
                         T: int) -> torch.Tensor:
    """(B, T) advantages: row i is ``token_advantages[i]`` (0 past its end: padding), or
    ``advantages_B[i]`` on every target when that is None."""
    adv_B_T = advantages_B.float()[:, None].expand(len(advantages_B), T).clone()
    for i, adv_T in enumerate(token_advantages):
        if adv_T is not None:
            adv_B_T[i] = 0.0
            adv_B_T[i, :len(adv_T)] = adv_T
    return adv_B_T


def token_advantages_of(groups: list[Group]) -> list[torch.Tensor | None] | None:
    """The groups' per-token advantages, one entry per sample in order (None where a group has
    none); None when no group has any: the scalar batch, built as it always was."""
    if all(g.token_advantages is None for g in groups):
        return None
    return [t for g in groups for t in (g.token_advantages or [None] * len(g.members))]


def _joined(samples: list[RolloutRecord], name: str, dtype: torch.dtype) -> torch.Tensor:
    """Every sample's ``name`` array (array.array, native byte order) end to end, one 1-D tensor
    that owns its memory (the samples' arrays are left untouched)."""
    joined = bytearray(b"".join(getattr(s, name) for s in samples))
    return torch.frombuffer(joined, dtype=dtype) if joined else torch.empty(0, dtype=dtype)
