"""One trainer per run: the trainer lease and the fenced writes (docs/design.md §15.36 A
trainer lease fences every trainer write); and the trainer's check that Redis still holds the
events it read (§15.37 The commit checks that Redis kept what the trainer read).

A trainer takes ``rl:{run}:trainer_lease`` (``SET NX PX``, a random token naming its host and
pid) before it reads anything, renews it from a daemon thread every TTL / 3 (a training step on
a big model may take minutes without a read) and releases it when it stops (only if it is
still its own). A second trainer, or one restarted after a SIGKILL while the dead one's lease
is still live, stands by: it reads nothing but the events stream (to notice the end of the
run), writes nothing, logs who holds the lease until when, and takes over once it lapses, so
a restarted trainer waits at most one TTL.

The lease alone would not fence a trainer that lost it without noticing (paused past its TTL,
cut off from Redis): every Redis write of a trainer therefore checks the token in the same Lua
script as the write (``fenced_write`` here, the commit script in ``commit.py``) and a refused
one raises, so that trainer stops.
"""
from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable

import redis

from rlstream.core import bus, keys
from rlstream.core.codec import encode
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import Message
from rlstream.core.run_state import RunState

log = logging.getLogger(__name__)
LEASE_TTL_S = 15.0  # how long a SIGKILLed trainer's successor waits, at most
STANDBY_POLL_S = 0.5  # a standby's takeover latency once the lease lapses
STANDBY_LOG_EVERY_S = 5.0
ROLLBACK_CHECK_EVERY_S = 5.0  # and after every connection error (``RollbackWatch``)

# KEYS: lease. ARGV: token, ttl ms. Renews only our own lease: one that expired or was taken
# over is lost for good (another trainer may have written since).
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, holder}
end
return {0, holder or ''}
"""

# KEYS: lease. ARGV: token.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: lease, stream to XADD to, stream to XACK on. ARGV: token, encoded message ('' for
# none: an encoded message is never empty), consumer group, entry ids to XACK...
# 'm' is bus.FIELD. XACKs in chunks: unpack() is bounded by Lua's C stack (~8000 values).
_FENCED = """
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  return {'fenced', holder or ''}
end
local id = ''
if ARGV[2] ~= '' then
  id = redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
end
for i = 4, #ARGV, 1000 do
  redis.call('XACK', KEYS[3], ARGV[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return {'ok', id}
"""


class TrainerLease:
    """One trainer's hold on ``run_id``: ``acquire`` (standing by while another trainer holds
    it), ``hold`` (take it now or refuse), ``check`` / ``confirm`` (raise once it is lost),
    ``release``. ``lost_to`` is set when a renewal or a fenced write found another holder."""

    def __init__(self, r: redis.Redis, run_id: str, *, ttl_s: float = LEASE_TTL_S, token: str | None = None):
        self.r, self.run_id, self.key = r, run_id, keys.trainer_lease(run_id)
        self.ttl_ms = int(ttl_s * 1000)
        self.token = token or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self.held, self.lost_to = False, None
        self._stop = threading.Event()  # a fresh one per take: set, it ends that take's renewal thread

    # ----------------------------------------------------------------- taking it
    def try_take(self) -> bool:
        if not self.held and self.r.set(self.key, self.token, nx=True, px=self.ttl_ms):
            self.held, self.lost_to, self._stop = True, None, threading.Event()
            threading.Thread(target=self._renew_loop, args=(self._stop,), name="trainer-lease", daemon=True).start()
        return self.held

    def hold(self) -> None:
        """Take the lease now unless this trainer holds it already; refuse when another does."""
        if not self.try_take():
            holder, left = self.holder()
            raise RlstreamError(f"run {self.run_id} already has a trainer: {holder or 'another'} holds its trainer "
                                f"lease (expires in {left:.0f} s unless renewed). Stop that trainer first; "
                                f"`rlstream trainer` stands by until it stops")

    def acquire(self, *, poll_s: float = STANDBY_POLL_S, log_every_s: float = STANDBY_LOG_EVERY_S) -> bool:
        """Take the lease, standing by while another trainer holds it: True once held. A
        standby reads only the events stream, to notice the end of the run: then it returns
        False without training (also when it took the lease just as the holder finished)."""
        if self.try_take():
            return True
        state, cursor, logged = RunState(), "0-0", -math.inf
        while True:
            entries, cursor = bus.read_events(self.r, self.run_id, cursor)
            for _, msg in entries:
                state.apply(msg)
            if state.finished is not None:
                self.release()
                log.info("trainer: run %s finished (%s) while this trainer stood by; nothing to do", self.run_id,
                         state.finished.reason)
                return False
            if self.held:
                log.warning("trainer: took over run %s's trainer lease", self.run_id)
                return True
            if time.monotonic() - logged >= log_every_s:
                holder, left = self.holder()
                log.warning("trainer: standing by: trainer %s holds run %s's trainer lease (expires in %.1f s unless "
                            "renewed); this one reads and writes nothing until it can take over", holder or "(none)",
                            self.run_id, left)
                logged = time.monotonic()
            time.sleep(poll_s)
            self.try_take()

    def holder(self) -> tuple[str | None, float]:
        """The token holding the lease (None when free) and its seconds left."""
        with self.r.pipeline(transaction=True) as pipe:
            pipe.get(self.key)
            pipe.pttl(self.key)
            token, pttl = pipe.execute()
        return (bus.as_text(token) if token else None), max(int(pttl), 0) / 1000

    # ----------------------------------------------------------------- keeping it
    def _renew_loop(self, stop: threading.Event) -> None:
        every = wait = self.ttl_ms / 3000
        while not stop.wait(wait):
            try:
                if not self.renew():
                    if not stop.is_set():
                        log.error("trainer: %s", self.lost_error())
                    return
                wait = every
            except redis.RedisError as exc:  # after the client's own retries: try again soon, the TTL runs
                wait = min(1.0, every)
                log.warning("trainer: could not renew run %s's trainer lease (%s); retrying", self.run_id, exc)

    def renew(self) -> bool:
        """Extend our lease by a TTL; False (and ``lost_to`` set) when it is no longer ours."""
        ok, holder = self.r.register_script(_RENEW)(keys=[self.key], args=[self.token, self.ttl_ms])
        if not ok:
            self.lost(bus.as_text(holder))
        return bool(ok)

    def lost(self, holder: str) -> RlstreamError:
        """Record that ``holder`` ('' = nobody: it expired) has the lease; the error to raise."""
        self.held, self.lost_to = False, holder
        return self.lost_error()

    def lost_error(self) -> RlstreamError:
        if self.lost_to:
            return RlstreamError(f"lost the trainer lease of run {self.run_id} to {self.lost_to}: another trainer took "
                                 "over this run; this one stops")
        return RlstreamError(f"lost the trainer lease of run {self.run_id}: it expired (not renewed for "
                             f"{self.ttl_ms / 1000:.0f} s: Redis unreachable, or this process was paused); this one "
                             "stops. Restart it: it resumes from what Redis holds")

    def check(self) -> None:
        """Raise if a renewal or a fenced write found the lease lost (no round trip)."""
        if self.lost_to is not None:
            raise self.lost_error()

    def confirm(self) -> None:
        """Before writing files another trainer may own (a weights directory): one round trip
        to make sure the lease is still ours. A no-op for a trainer that never took one (replay)."""
        self.check()
        if self.held:
            token = self.r.get(self.key)
            if token is None or bus.as_text(token) != self.token:
                raise self.lost(bus.as_text(token) if token else "")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours, so a successor starts at
        once. Redis unreachable: the lease lapses by itself within one TTL."""
        self._stop.set()
        if not self.held:
            return
        self.held = False
        try:
            self.r.register_script(_RELEASE)(keys=[self.key], args=[self.token])
        except redis.RedisError as exc:
            log.warning("trainer: could not release run %s's trainer lease (%s); it lapses within %.0f s",
                        self.run_id, exc, self.ttl_ms / 1000)


def fenced_write(r: redis.Redis, lease: TrainerLease, *, add: tuple[str, Message] | None = None,
                 ack: tuple[str, list[str]] | None = None) -> str | None:
    """XADD ``add`` = (stream, message) and/or XACK ``ack`` = (stream, entry ids) in the trainer
    group, atomically, only while ``lease`` is ours; returns the new entry id (None without
    ``add``). Raises the lease's error, nothing written, when another trainer holds it."""
    streams = [add[0] if add else ack[0], ack[0] if ack else add[0]]
    payload, ids = encode(add[1]) if add else b"", ack[1] if ack else []
    status, value = r.register_script(_FENCED)(keys=[lease.key, *streams],
                                               args=[lease.token, payload, keys.TRAINER_GROUP, *ids])
    if bus.as_text(status) == "fenced":
        raise lease.lost(bus.as_text(value))
    return bus.as_text(value) if add is not None else None


def events_lost(r: redis.Redis, run_id: str, event_id: str) -> bool:
    """True when an event this process read is gone: Redis came back without its last writes
    (a failover to a lagging replica, an AOF that lost its tail). Events are never deleted."""
    return event_id != "0-0" and not r.xrange(keys.events(run_id), min=event_id, max=event_id, count=1)


class RollbackWatch:
    """The trainer's check, between reads, that Redis still holds the events it folded.

    Redis can only lose writes across a restart or a failover, which the client sees as a
    connection error it retries through; the retried read then continues from the cursor on
    the new server and would step over the gap. So ``check(before)`` is handed the cursor as
    it was *before* the latest events read and tests it after every connection error (the
    error happened after ``before`` was read: if ``before`` survived, so did everything read
    up to it), and every ``every_s`` otherwise. A rollback stops the trainer: its restart
    resumes from what Redis holds."""

    def __init__(self, r: redis.Redis, run_id: str, connection_errors: Callable[[], int], *,
                 every_s: float = ROLLBACK_CHECK_EVERY_S):
        self.r, self.run_id, self.connection_errors, self.every_s = r, run_id, connection_errors, every_s
        self.errors_seen, self.last_check = connection_errors(), time.monotonic()

    def check(self, before: str) -> None:
        errors = self.connection_errors()
        if errors == self.errors_seen and time.monotonic() - self.last_check < self.every_s:
            return
        self.errors_seen, self.last_check = errors, time.monotonic()
        if events_lost(self.r, self.run_id, before):
            raise RlstreamError(
                f"Redis lost the tail of run {self.run_id}'s events stream: event {before}, which this trainer had "
                "read, is gone (a failover to a lagging replica, or an AOF that lost its last writes). The trainer "
                "stops so that its restart resumes from what Redis holds (`rlstream up` restarts it; restart a "
                "standalone trainer yourself)")
