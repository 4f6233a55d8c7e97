"""The commit protocol (docs/design.md §7 Commit protocol; the weights are already
sealed on disk when these run):

1. one Lua script (atomic like MULTI/EXEC): XADD ``StepCommitted`` (with the rollouts-stream
   entry ids it trained on) + XACK of those entries + the run's committed-step record.
   Either all happen or none: a crash before it leaves the entries pending (retrained on
   resume), after it they are recorded as trained. Unlike MULTI/EXEC it is idempotent: the
   client re-sends a command whose reply a dying redis-server never sent, and the script
   then finds step N already recorded with the same digest and writes nothing.
2. XADD ``WeightsPublished``: producers and workers move to the new version.
"""
from __future__ import annotations

import hashlib
import logging

import redis

from rlstream.core import bus, keys
from rlstream.core.codec import encode
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import GroupRejected, StepCommitted, WeightsPublished
from rlstream.trainer.batch import Group

log = logging.getLogger(__name__)

# KEYS: committed-step hash, events stream, rollouts stream.
# ARGV: step, encoded StepCommitted, its digest, consumer group, entry ids...
_COMMIT = """
local step = tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'step') or '0')
if current == step and redis.call('HGET', KEYS[1], 'digest') == ARGV[3] then
  return {'duplicate', redis.call('HGET', KEYS[1], 'event_id')}
end
if current ~= step - 1 then
  return {'conflict', tostring(current)}
end
-- Redis does not roll a script back when a command fails midway: check that the XACKs
-- below can succeed (the consumer group exists) before the XADD writes anything.
local group = redis.pcall('XPENDING', KEYS[3], ARGV[4])
if type(group) == 'table' and group.err then
  return {'nogroup', group.err}
end
local id = redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
-- in chunks: unpack() is bounded by Lua's C stack (~8000 values)
for i = 5, #ARGV, 1000 do
  redis.call('XACK', KEYS[3], ARGV[4], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HSET', KEYS[1], 'step', step, 'event_id', id, 'digest', ARGV[3])
return {'committed', id}
"""

# KEYS: committed-step hash. ARGV: step, its event id. Raise the record to the folded
# events (runs from before the record existed, or a record lost with its events); never lower it.
_SYNC = """
local current = tonumber(redis.call('HGET', KEYS[1], 'step') or '-1')
if current < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'step', ARGV[1], 'event_id', ARGV[2])
  redis.call('HDEL', KEYS[1], 'digest')
end
return current
"""


def step_record(step: int, version: int, groups: list[Group], metrics: dict[str, float]) -> StepCommitted:
    """What a step commits: the entries, samples and groups it trained, in training order
    (a resume replays the step on exactly these), and its metrics line."""
    return StepCommitted(step=step, version=version, entry_ids=[e for g in groups for e in g.entry_ids],
                         sample_ids=[s.sample_id for g in groups for s in g.samples],
                         group_ids=[g.group_id for g in groups], metrics=metrics)


def commit_step(r: redis.Redis, run_id: str, committed: StepCommitted) -> str:
    """Returns the ``StepCommitted`` event id (the existing one when this exact commit had
    already been applied). Raises when the run's record is not at step - 1."""
    payload = encode(committed)
    digest = hashlib.sha256(payload).hexdigest()
    status, value = r.register_script(_COMMIT)(
        keys=[keys.committed_step(run_id), keys.events(run_id), keys.rollouts(run_id)],
        args=[committed.step, payload, digest, keys.TRAINER_GROUP, *committed.entry_ids])
    status, value = bus.as_text(status), bus.as_text(value)
    if status == "duplicate":
        log.warning("step %d was already committed (a retried commit after a lost reply); not written again",
                    committed.step)
    elif status == "nogroup":
        raise RlstreamError(f"commit of step {committed.step} refused, nothing written: {value}. The rollouts "
                            f"stream's consumer group is gone (deleted by hand?); restart the trainer to recreate it")
    elif status == "conflict":
        raise RlstreamError(
            f"commit of step {committed.step} refused: run {run_id} has already committed step {value}, "
            f"not {committed.step - 1}. Another trainer is running for this run (stop every trainer but one "
            f"and restart it), or {keys.committed_step(run_id)} disagrees with the events stream "
            f"(check with `rlstream audit {run_id}`)")
    return value


def sync_committed_step(r: redis.Redis, run_id: str, step: int, event_id: str) -> int:
    """At resume: raise the committed-step record to the folded events (SET if missing or
    lower). Returns the record's previous step (-1 when missing)."""
    return int(r.register_script(_SYNC)(keys=[keys.committed_step(run_id)], args=[step, event_id]))


def publish(r: redis.Redis, run_id: str, published: WeightsPublished) -> None:
    bus.xadd(r, keys.events(run_id), published)


def ack_untrained(r: redis.Redis, run_id: str, entry_ids: list[str]) -> None:
    """Duplicates and samples of settled groups: acknowledged, never trained."""
    if entry_ids:
        r.xack(keys.rollouts(run_id), keys.TRAINER_GROUP, *entry_ids)


def reject_group(r: redis.Redis, run_id: str, group_id: str, entry_ids: list[str], reason: str) -> GroupRejected:
    """An explicit ``GroupRejected`` (frees its gate slots) and the XACK of its entries, in
    one MULTI. A retried MULTI may write the event twice: harmless, every fold keeps the first."""
    rejected = GroupRejected(group_id=group_id, reason=reason, by="trainer")
    with r.pipeline(transaction=True) as pipe:
        bus.xadd(pipe, keys.events(run_id), rejected)
        if entry_ids:
            pipe.xack(keys.rollouts(run_id), keys.TRAINER_GROUP, *entry_ids)
        pipe.execute()
    return rejected
