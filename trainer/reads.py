"""The trainer's reads of the rollouts stream through the consumer group ``trainer``: new
entries (``>``), the pending-entries list page by page (the durable buffer a restarted
trainer reads back), the pending entries no read returned (a lost reply), the entries a
committed step names (replay), and the dead letters that name their group. Every entry is
decoded and checked on the way; a bad one is dead-lettered and acked in one MULTI so that
the trainer keeps running.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import redis

from rlstream.core import keys
from rlstream.core.bus import FIELD, Entry, as_text, xadd, xrange_all
from rlstream.core.codec import DecodeError, decode, decode_samples
from rlstream.core.messages import DeadLetter, RolloutRecord

log = logging.getLogger(__name__)


def dead_letter(pipe: Any, run_id: str, source_stream: str, entry_id: str, reason: str, raw: bytes,
                sample: RolloutRecord | None = None) -> None:
    log.warning("dead-lettered %s %s: %s", source_stream, entry_id, reason)
    member = dict(sample_id=sample.sample_id, group_id=sample.group_id, group_size=sample.group_size) \
        if _stamped(sample) else {}
    xadd(pipe, keys.dead(run_id), DeadLetter(
        source_stream=source_stream, source_id=entry_id, reason=reason, raw=raw[:65536], **member))


def decode_entries(
    r: redis.Redis, run_id: str, stream: str, raw_entries: list, *, group: str | None,
    vocab_size: int | None = None, max_seq_len: int | None = None, invalid: list[Entry] | None = None,
) -> list[Entry]:
    """Decode stream entries; invalid ones go to the dead-letter stream (and are XACKed
    in the same MULTI when read through ``group``) so that consumers keep running.

    ``invalid`` collects the dead-lettered entries that are well-formed, worker-stamped
    samples failing only the vocabulary / ``max_seq_len`` checks: their group will never
    complete, and the trainer must settle it rather than wait for it forever."""
    good: list[Entry] = []
    bad: list[tuple[str, str, bytes, RolloutRecord | None]] = []
    raws = [(fields or {}).get(FIELD, b"") for _, fields in raw_entries]
    decoded = decode_samples(raws)  # each a sample or the DecodeError that says why not
    # The limits checked once for the batch; only when that fails does each sample get its own check (and message).
    within = RolloutRecord.within_limits([m for m in decoded if not isinstance(m, DecodeError)], vocab_size,
                                         max_seq_len)
    for (entry_id, _), raw, msg in zip(raw_entries, raws, decoded):
        sid, blob = as_text(entry_id), raw if isinstance(raw, bytes) else b""
        if isinstance(msg, DecodeError):
            bad.append((sid, str(msg), blob, None))
            continue
        try:
            if not within:
                msg.check_limits(vocab_size, max_seq_len)
            if not _stamped(msg):
                raise ValueError("sample has no sample_id/group_id/group_size (not stamped by a worker)")
        except ValueError as exc:
            bad.append((sid, str(exc), blob, msg))
            if invalid is not None and _stamped(msg):
                invalid.append((sid, msg))
            continue
        good.append((sid, msg))
    if bad:
        with r.pipeline(transaction=True) as pipe:
            for sid, reason, raw, msg in bad:
                dead_letter(pipe, run_id, stream, sid, reason, raw, msg)
            if group is not None:
                pipe.xack(stream, group, *[sid for sid, *_ in bad])
            pipe.execute()
    return good


def _stamped(msg: RolloutRecord | None) -> bool:
    return msg is not None and bool(msg.sample_id and msg.group_id) and msg.group_size >= 1


def read_group(
    r: redis.Redis, run_id: str, consumer: str, *, count: int, block_ms: int | None,
    vocab_size: int | None = None, max_seq_len: int | None = None, invalid: list[Entry] | None = None,
    delivered: list[int] | None = None,
) -> list[Entry]:
    """XREADGROUP of new entries (``>``) on the rollouts stream; ``read_pending`` and
    ``read_all_pending`` read this consumer's durable buffer. ``invalid``: see ``decode_entries``.
    ``delivered`` gets the number of entries read, decodable or not (fewer than ``count``: the
    read caught up with the stream)."""
    stream = keys.rollouts(run_id)
    reply = r.xreadgroup(keys.TRAINER_GROUP, consumer, {stream: ">"}, count=count, block=block_ms)
    raw_entries = reply[0][1] if reply else []
    if delivered is not None:
        delivered.append(len(raw_entries))
    return decode_entries(r, run_id, stream, raw_entries, group=keys.TRAINER_GROUP,
                          vocab_size=vocab_size, max_seq_len=max_seq_len, invalid=invalid)


def read_pending(
    r: redis.Redis, run_id: str, consumer: str, after: str, *, count: int,
    vocab_size: int | None = None, max_seq_len: int | None = None, invalid: list[Entry] | None = None,
) -> tuple[list[Entry], str | None]:
    """One page of this consumer's pending entries with ids > ``after``: (valid entries,
    the last id read or None when the list is exhausted). Page with the returned id.

    A pending entry whose payload was deleted (XDEL, trimming) comes back empty: it can
    never be trained, so it is acked (with a warning) instead of staying pending forever."""
    stream = keys.rollouts(run_id)
    reply = r.xreadgroup(keys.TRAINER_GROUP, consumer, {stream: after}, count=count)
    page = reply[0][1] if reply else []
    if not page:
        return [], None
    _ack_gone(r, stream, [as_text(e[0]) for e in page if not e[1]])
    good = decode_entries(r, run_id, stream, [e for e in page if e[1]], group=keys.TRAINER_GROUP,
                          vocab_size=vocab_size, max_seq_len=max_seq_len, invalid=invalid)
    return good, as_text(page[-1][0])  # the raw page's last id: a page of deleted entries is not the end


def read_all_pending(r: redis.Redis, run_id: str, consumer: str, *, count: int = 512,
                     vocab_size: int | None = None, max_seq_len: int | None = None,
                     invalid: list[Entry] | None = None) -> list[Entry]:
    """This consumer's whole pending-entries list (every page), decoded."""
    out: list[Entry] = []
    after: str | None = "0"
    while after is not None:
        entries, after = read_pending(r, run_id, consumer, after, count=count, vocab_size=vocab_size,
                                      max_seq_len=max_seq_len, invalid=invalid)
        out.extend(entries)
    return out


def read_unheld_pending(r: redis.Redis, run_id: str, consumer: str, held: set[str], *, page: int = 1000,
                        vocab_size: int | None = None, max_seq_len: int | None = None,
                        invalid: list[Entry] | None = None) -> list[Entry]:
    """This consumer's pending entries that are not in ``held``, decoded. Only ids travel
    for the held ones (XPENDING), so a periodic check costs little however large the
    buffer; payloads that are gone are acked with a warning, as in ``read_pending``."""
    stream, wanted, start = keys.rollouts(run_id), [], "-"
    while True:
        rows = r.xpending_range(stream, keys.TRAINER_GROUP, min=start, max="+", count=page, consumername=consumer)
        wanted += [sid for sid in (as_text(row["message_id"]) for row in rows) if sid not in held]
        if len(rows) < page:
            break
        start = "(" + as_text(rows[-1]["message_id"])
    if not wanted:
        return []
    raw = fetch_entries(r, stream, wanted)
    _ack_gone(r, stream, [sid for sid in wanted if sid not in raw])
    return decode_entries(r, run_id, stream, [(sid, {FIELD: raw[sid]}) for sid in wanted if sid in raw],
                          group=keys.TRAINER_GROUP, vocab_size=vocab_size, max_seq_len=max_seq_len, invalid=invalid)


def _ack_gone(r: redis.Redis, stream: str, gone: list[str]) -> None:
    """Pending entries whose payload was deleted (XDEL, trimming) can never be trained: ack
    them, with a warning, rather than leave them pending forever."""
    if gone:
        log.warning("acking %d pending entries of %s whose payload is gone (deleted or trimmed), e.g. %s",
                    len(gone), stream, gone[:5])
        r.xack(stream, keys.TRAINER_GROUP, *gone)


def dead_members(r: redis.Redis, run_id: str, page: int = 1000) -> Iterator[DeadLetter]:
    """Dead letters of worker-stamped samples (they failed the vocabulary / ``max_seq_len``
    checks; each names its sample and group): a restarted trainer settles their groups."""
    source = keys.rollouts(run_id)
    for _, raw in xrange_all(r, keys.dead(run_id), page=page):
        try:
            letter = decode(raw, expect=DeadLetter)
        except DecodeError:
            continue
        if letter.source_stream == source and letter.group_id:
            yield letter


def fetch_entries(r: redis.Redis, stream: str, entry_ids: list[str]) -> dict[str, bytes]:
    """Raw message bytes of specific entries (for replaying a committed step)."""
    with r.pipeline(transaction=False) as pipe:
        for entry_id in entry_ids:
            pipe.xrange(stream, entry_id, entry_id, count=1)
        replies = pipe.execute()
    return {as_text(rep[0][0]): rep[0][1].get(FIELD, b"") for rep in replies if rep}
