"""The trainer's staleness bound (docs/design.md §5 Versions and the gate): no group is
trained more than O + 1 versions after the weights it was sampled with, O =
``max_head_offpolicy_versions`` (0 under ``synchronous_training``).

The gate bounds admission only; a straggler (a slow rollout, a re-run job) completes at
whatever version the trainer has reached by then. ``RolloutBuffer`` asks ``stale_reason``
of every ready group when it fills and takes a batch, and drops (rejects) the ones past the
bound, so the bound holds for every trained sample whatever the wall-clock lateness.

Before it drops a group, the trainer gives it its last chance: a group still being sampled that
the step about to be taken is the last one allowed to train (``last_chance``) keeps a place in
that batch for a bounded time (``StragglerWait``, ``trainer.straggler_wait``; docs/design.md
§15.76 A straggler's last step waits for it).
"""
from __future__ import annotations

from collections.abc import Iterable

from rlstream.core.config import Config
from rlstream.core.messages import GroupAdmitted
from rlstream.core.run_state import RunState
from rlstream.trainer.batch import Group

STALE_PREFIX = "stale:"  # every staleness GroupRejected reason starts with it (metrics count them)


def staleness_bound(cfg: Config) -> int:
    """O + 1: the largest trainer-version - sampled-version a trained sample may have."""
    return cfg.offpolicy_versions + 1


def sampling_follows_weights(cfg: Config) -> bool:
    """Whether samples are stamped with the weights the trainer publishes. Not when no version
    is published after v0 (``weight_sync_interval = 0``) or a generic OpenAI-compatible server
    is never told of new weights (backend "openai" without ``inference.weight_sync_url``): every
    sample then says v0, by configuration, and the bound counts from the version the group was
    admitted at instead. vllm and sglang servers are always synced (through their own routes)."""
    unsynced_server = cfg.inference.backend == "openai" and cfg.inference.weight_sync_url is None
    return cfg.weight_sync_interval > 0 and not unsynced_server


def sampled_version(group: Group, follows_weights: bool) -> int:
    """The oldest weights any member was sampled with (``min_version``), or the admission
    version when sampling does not follow the published weights."""
    if not follows_weights:
        return group.submit_version
    return min(s.min_version for s in group.samples) if group.members else 0


def stale_reason(group: Group, trainer_version: int, bound: int, follows_weights: bool) -> str | None:
    """The GroupRejected reason when training ``group`` with the weights of ``trainer_version``
    (the version before the step) would break the bound, else None."""
    sampled = sampled_version(group, follows_weights)
    offset = trainer_version - sampled
    if offset <= bound:
        return None
    what = "sampled with" if follows_weights else "admitted at"
    return (f"{STALE_PREFIX} {what} v{sampled}, trainer at v{trainer_version}: {offset} versions behind, over "
            f"the bound max_head_offpolicy_versions + 1 = {bound}")


def split_stale(ready: list[Group], trainer_version: int, bound: int,
                follows_weights: bool) -> tuple[list[Group], list[tuple[Group, str]]]:
    """(the groups within the bound, in order; the others with their reasons)."""
    keep, stale = [], []
    for group in ready:
        reason = stale_reason(group, trainer_version, bound, follows_weights)
        if reason is None:
            keep.append(group)
        else:
            stale.append((group, reason))
    return keep, stale


def last_chance(open_groups: Iterable[GroupAdmitted], here: set[str], trainer_version: int, bound: int) -> list[str]:
    """The admitted groups not yet ``here`` (still being sampled) that a step taken at ``trainer_version`` is the
    last one allowed to train: admitted ``bound`` versions before it, so the next step would drop them. Counted
    from admission, the only version known before a group's samples arrive: a group whose draws started with
    newer weights has more time (then waiting for it is merely early), and one admitted earlier is past saving
    unless its draws started later (not waited for: each group has one last step, so each is waited for at most
    once, however long it hangs)."""
    return [g.group_id for g in open_groups if g.group_id not in here and trainer_version - g.submit_version == bound]


class StragglerWait:
    """How long a batch keeps places for its ``last_chance`` groups: from the moment it could be taken without
    them, at most ``factor`` x the previous step's period (from one batch taken to the next, less what that step
    waited here), so a step at most doubles (factor 1) and a hung group costs one wait. The first batch a
    process takes does not wait: it has no period yet."""

    def __init__(self, factor: float):
        self.factor = factor
        self.period = 0.0
        self.last_take: float | None = None
        self.since: float | None = None  # when the batch could first have been taken without them

    def holding(self, now: float, batch_ready: bool) -> bool:
        """Whether to keep the places now, asked while a last-chance group is still being sampled;
        ``batch_ready``: enough groups are here to take the batch without it."""
        if not batch_ready:
            return True  # the batch waits for groups anyway: nothing is spent on this one yet
        if self.since is None:
            self.since = now
        return now - self.since < self.factor * self.period

    def taken(self, now: float) -> float:
        """A batch was taken at ``now``: the seconds it waited for last-chance groups."""
        waited = 0.0 if self.since is None else now - self.since
        if self.last_take is not None:
            self.period = max(0.0, now - self.last_take - waited)
        self.last_take, self.since = now, None
        return waited


def stale_total(state: RunState) -> int:
    """Groups the trainer dropped as stale over the whole run (the fold keeps every reason)."""
    return sum(1 for reason in state.rejected.values() if reason.startswith(STALE_PREFIX))
