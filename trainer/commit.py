"""The commit protocol (docs/design.md §7 Commit protocol; the weights are already
sealed on disk when these run):

1. one Lua script (atomic like MULTI/EXEC): XADD ``StepCommitted`` (with the rollouts-stream
   entry ids it trained on) + XACK of those entries + the run's committed-step record.
   Either all happen or none: a crash before it leaves the entries pending (retrained on
   resume), after it they are recorded as trained. Unlike MULTI/EXEC it is idempotent: the
   client re-sends a command whose reply a dying redis-server never sent, and the script
   then finds step N already recorded with the same digest and writes nothing. It writes
   only for the holder of the trainer lease (``lease.py``), and only when Redis still holds
   what the trainer read: the last event it folded, and every entry it acks, pending.
2. XADD ``WeightsPublished``: producers and workers move to the new version.

Every other trainer write here (publish, rejections, acks of duplicates, the record's sync
at resume) checks the lease in the same script as the write, too.
"""
from __future__ import annotations

import hashlib
import logging

import redis

from rlstream.core import bus, keys
from rlstream.core.archive import id_key
from rlstream.core.codec import encode
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import GroupRejected, StepCommitted, WeightsPublished
from rlstream.core.run_state import TRAINER
from rlstream.trainer.batch import Group
from rlstream.trainer.lease import TrainerLease, fenced_write

log = logging.getLogger(__name__)

# KEYS: committed-step hash, events stream, rollouts stream, trainer lease.
# ARGV: step, encoded StepCommitted, its digest, consumer group, lease token, the last event
# the trainer folded ('0-0': none), the entry ids (one argument, space-separated: 256 arguments
# cost the client ~0.15 ms to pack), their number, the lowest and the highest of them ('-' and
# '+' when unknown).
_COMMIT = """
local holder = redis.call('GET', KEYS[4])
if holder ~= ARGV[5] then
  return {'fenced', holder or ''}
end
local step = tonumber(ARGV[1])
local current = tonumber(redis.call('HGET', KEYS[1], 'step') or '0')
if current == step and redis.call('HGET', KEYS[1], 'digest') == ARGV[3] then
  return {'duplicate', redis.call('HGET', KEYS[1], 'event_id')}
end
if current ~= step - 1 then
  return {'conflict', tostring(current)}
end
-- Redis that came back without its last writes (failover to a lagging replica, an AOF that
-- lost its tail) no longer holds what this trainer read: its step must not be recorded.
if ARGV[6] ~= '0-0' and #redis.call('XRANGE', KEYS[2], ARGV[6], ARGV[6], 'COUNT', 1) == 0 then
  return {'rolled_back', 'event ' .. ARGV[6] .. ', the last this trainer folded, is gone from the events stream'}
end
-- Redis does not roll a script back when a command fails midway: check that the XACKs
-- below can succeed (the consumer group exists) before the XADD writes anything.
local group = redis.pcall('XPENDING', KEYS[3], ARGV[4])
if type(group) == 'table' and group.err then
  return {'nogroup', group.err}
end
local ids = {}
for id in string.gmatch(ARGV[7], '[^ ]+') do
  ids[#ids + 1] = id
end
if #ids ~= tonumber(ARGV[8]) then
  return {'bad_ids', #ids .. ' space-separated ids for ' .. ARGV[8] .. ' entries'}
end
-- Every entry must be pending: a StepCommitted naming entries that are gone could never be
-- replayed. One XPENDING of the range the ids span, at most two rows per id (a step's size,
-- not the pending list's), then one XPENDING per id that page did not show (no unpack()).
local seen = {}
if #ids > 0 then
  for _, row in ipairs(redis.call('XPENDING', KEYS[3], ARGV[4], ARGV[9], ARGV[10], 2 * #ids)) do
    seen[row[1]] = true
  end
end
local missing = {}
for _, id in ipairs(ids) do
  if not seen[id] and #redis.call('XPENDING', KEYS[3], ARGV[4], id, id, 1) == 0 then
    missing[#missing + 1] = id
  end
end
if #missing > 0 then
  return {'not_pending', #missing .. ' of the ' .. #ids .. ' rollouts entries it trained on are not ' ..
          'pending in the consumer group (e.g. ' .. table.concat(missing, ' ', 1, math.min(#missing, 5)) .. ')'}
end
local id = redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
-- in chunks: unpack() is bounded by Lua's C stack (~8000 values)
for i = 1, #ids, 1000 do
  redis.call('XACK', KEYS[3], ARGV[4], unpack(ids, i, math.min(i + 999, #ids)))
end
redis.call('HSET', KEYS[1], 'step', step, 'event_id', id, 'digest', ARGV[3])
return {'committed', id}
"""

# KEYS: committed-step hash, trainer lease. ARGV: step, its event id, lease token. Raise the
# record to the folded events (runs from before the record existed, or a record lost with its
# events); never lower it.
_SYNC = """
local holder = redis.call('GET', KEYS[2])
if holder ~= ARGV[3] then
  return {'fenced', holder or ''}
end
local current = tonumber(redis.call('HGET', KEYS[1], 'step') or '-1')
if current < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'step', ARGV[1], 'event_id', ARGV[2])
  redis.call('HDEL', KEYS[1], 'digest')
end
return {'synced', current}
"""


def step_record(step: int, version: int, groups: list[Group], metrics: dict[str, float]) -> StepCommitted:
    """What a step commits: the entries, samples and groups it trained, in training order
    (a resume replays the step on exactly these), and its metrics line."""
    return StepCommitted(step=step, version=version, entry_ids=[e for g in groups for e in g.entry_ids],
                         sample_ids=[s.sample_id for g in groups for s in g.samples],
                         group_ids=[g.group_id for g in groups], metrics=metrics)


def id_span(entry_ids: list[str]) -> tuple[str, str]:
    """The lowest and the highest of the stream ids (``('-', '+')`` when one does not parse: the
    script then checks the first ids of the whole pending list in one XPENDING, the rest one by one)."""
    try:
        spans = [id_key(e) for e in entry_ids]
    except ValueError:
        return "-", "+"
    if not spans:
        return "-", "+"
    lo, hi = min(spans), max(spans)
    return f"{lo[0]}-{lo[1]}", f"{hi[0]}-{hi[1]}"


def commit_step(r: redis.Redis, run_id: str, committed: StepCommitted, lease: TrainerLease,
                last_event: str = "0-0") -> str:
    """Returns the ``StepCommitted`` event id (the existing one when this exact commit had
    already been applied). Raises, nothing written, when ``lease`` is no longer ours, when the
    run's record is not at step - 1, when ``last_event`` (the last event the trainer folded)
    is gone, or when an entry is not pending: Redis lost writes the trainer had read."""
    payload = encode(committed)
    digest = hashlib.sha256(payload).hexdigest()
    status, value = r.register_script(_COMMIT)(
        keys=[keys.committed_step(run_id), keys.events(run_id), keys.rollouts(run_id), lease.key],
        args=[committed.step, payload, digest, keys.TRAINER_GROUP, lease.token, last_event,
              " ".join(committed.entry_ids), len(committed.entry_ids), *id_span(committed.entry_ids)])
    status, value = bus.as_text(status), bus.as_text(value)
    refused = f"commit of step {committed.step} refused, nothing written"
    if status == "duplicate":
        log.warning("step %d was already committed (a retried commit after a lost reply); not written again",
                    committed.step)
    elif status == "fenced":
        raise RlstreamError(f"{refused}: {lease.lost(value)}")
    elif status == "bad_ids":  # an id with a space in it, or an empty one: no stream id
        raise RlstreamError(f"{refused}: {value} (entry ids {committed.entry_ids[:5]}...)")
    elif status == "nogroup":
        raise RlstreamError(f"{refused}: {value}. The rollouts "
                            f"stream's consumer group is gone (deleted by hand?); restart the trainer to recreate it")
    elif status == "conflict":
        raise RlstreamError(
            f"commit of step {committed.step} refused: run {run_id} has already committed step {value}, "
            f"not {committed.step - 1}. Another trainer is running for this run (stop every trainer but one "
            f"and restart it), or {keys.committed_step(run_id)} disagrees with the events stream "
            f"(check with `rlstream audit {run_id}`)")
    elif status in ("rolled_back", "not_pending"):
        raise RlstreamError(f"{refused}: {value}. Redis lost writes this trainer had read (a failover to a lagging "
                            "replica, or an AOF that lost its last writes); the trainer stops so that its restart "
                            "resumes from what Redis holds (`rlstream up` restarts it; restart a standalone trainer "
                            "yourself)")
    return value


def sync_committed_step(r: redis.Redis, run_id: str, step: int, event_id: str, lease: TrainerLease) -> int:
    """At resume: raise the committed-step record to the folded events (SET if missing or
    lower). Returns the record's previous step (-1 when missing)."""
    status, value = r.register_script(_SYNC)(keys=[keys.committed_step(run_id), lease.key],
                                             args=[step, event_id, lease.token])
    if bus.as_text(status) == "fenced":
        raise lease.lost(bus.as_text(value))
    return int(value)


def publish(r: redis.Redis, run_id: str, published: WeightsPublished, lease: TrainerLease) -> None:
    fenced_write(r, lease, add=(keys.events(run_id), published))


def ack_untrained(r: redis.Redis, run_id: str, entry_ids: list[str], lease: TrainerLease) -> None:
    """Duplicates and samples of settled groups: acknowledged, never trained."""
    if entry_ids:
        fenced_write(r, lease, ack=(keys.rollouts(run_id), entry_ids))


def reject_group(r: redis.Redis, run_id: str, group_id: str, entry_ids: list[str], reason: str,
                 lease: TrainerLease) -> GroupRejected:
    """An explicit ``GroupRejected`` (frees its gate slots) and the XACK of its entries, in
    one fenced script. A retried script may write the event twice: harmless, every fold keeps
    the first."""
    rejected = GroupRejected(group_id=group_id, reason=reason, by=TRAINER)
    fenced_write(r, lease, add=(keys.events(run_id), rejected), ack=(keys.rollouts(run_id), entry_ids))
    return rejected
