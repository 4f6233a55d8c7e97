"""The commit protocol of DESIGN.md section 5, steps 5-6 (the weights are already
sealed on disk when these run):

1. one MULTI/EXEC: XADD ``StepCommitted`` (with the rollouts-stream entry ids it trained
   on) + XACK of those entries. Either both happen or neither: a crash before EXEC leaves
   the entries pending (retrained on resume), after it they are recorded as trained.
2. XADD ``WeightsPublished``: producers and workers move to the new version.
"""
from __future__ import annotations

import redis

from rlstream import keys, streams
from rlstream.messages import GroupRejected, StepCommitted, WeightsPublished


def commit_step(r: redis.Redis, run_id: str, committed: StepCommitted) -> str:
    """Returns the ``StepCommitted`` event id."""
    with r.pipeline(transaction=True) as pipe:
        streams.xadd(pipe, keys.events(run_id), committed)
        if committed.entry_ids:
            pipe.xack(keys.rollouts(run_id), keys.TRAINER_GROUP, *committed.entry_ids)
        event_id = pipe.execute()[0]
    return event_id.decode() if isinstance(event_id, bytes) else event_id


def publish(r: redis.Redis, run_id: str, published: WeightsPublished) -> None:
    streams.xadd(r, keys.events(run_id), published)


def ack_untrained(r: redis.Redis, run_id: str, entry_ids: list[str]) -> None:
    """Duplicates and samples of settled groups: acknowledged, never trained."""
    if entry_ids:
        r.xack(keys.rollouts(run_id), keys.TRAINER_GROUP, *entry_ids)


def reject_group(r: redis.Redis, run_id: str, group_id: str, entry_ids: list[str], reason: str) -> None:
    """An explicit ``GroupRejected`` (frees its gate slots) and the XACK of its entries, in one MULTI."""
    with r.pipeline(transaction=True) as pipe:
        streams.xadd(pipe, keys.events(run_id), GroupRejected(group_id=group_id, reason=reason, by="trainer"))
        if entry_ids:
            pipe.xack(keys.rollouts(run_id), keys.TRAINER_GROUP, *entry_ids)
        pipe.execute()
