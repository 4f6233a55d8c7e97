"""rlstream.core.bus and rlstream.trainer.buffer on fakeredis: consumer-group reads,
dead-lettering, events."""
from __future__ import annotations

import msgpack
from factories import sample

from rlstream.core import bus, keys
from rlstream.core.codec import decode, encode
from rlstream.core.connection import count_connection_errors
from rlstream.core.messages import DeadLetter, GroupAdmitted, GroupRejected, RunFinished, WeightsPublished, group_id_for
from rlstream.trainer import reads

RUN = "t1"
ROLLOUTS = keys.rollouts(RUN)
DEAD = keys.dead(RUN)


def pending_ids(r) -> list[str]:
    return [e["message_id"].decode() for e in r.xpending_range(ROLLOUTS, keys.TRAINER_GROUP, min="-", max="+",
                                                                  count=1000)]


def sid(entry_id) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def test_ensure_group_is_idempotent_and_creates_the_stream(r):
    bus.ensure_group(r, ROLLOUTS)
    bus.ensure_group(r, ROLLOUTS)
    assert r.exists(ROLLOUTS)
    assert bus.group_info(r, ROLLOUTS) == {"pending": 0, "lag": 0, "consumers": 0}


def test_xadd_read_group_round_trip(r):
    bus.ensure_group(r, ROLLOUTS)
    msgs = [sample(), sample(member=1)]
    ids = [sid(bus.xadd(r, ROLLOUTS, m)) for m in msgs]
    assert r.xrange(ROLLOUTS)[0][1] == {bus.FIELD: encode(msgs[0])}
    got = reads.read_group(r, RUN, "c1", count=10, block_ms=None)
    assert [e for e, _ in got] == ids
    assert [m for _, m in got] == msgs
    assert pending_ids(r) == ids  # read, not yet acked: the trainer's durable buffer
    # nothing new
    assert reads.read_group(r, RUN, "c1", count=10, block_ms=None) == []
    # a restarted consumer re-reads its own pending entries
    again = reads.read_all_pending(r, RUN, "c1")
    assert [(e, m) for e, m in again] == list(zip(ids, msgs))
    assert reads.read_all_pending(r, RUN, "other") == []
    info = bus.group_info(r, ROLLOUTS)
    assert info["pending"] == 2 and info["consumers"] == 2
    r.xack(ROLLOUTS, keys.TRAINER_GROUP, *ids)
    assert pending_ids(r) == [] and bus.group_info(r, ROLLOUTS)["pending"] == 0


def test_read_group_respects_count(r):
    bus.ensure_group(r, ROLLOUTS)
    ids = [sid(bus.xadd(r, ROLLOUTS, sample(m, m % 2))) for m in range(5)]
    first = reads.read_group(r, RUN, "c", count=2, block_ms=1)
    rest = reads.read_group(r, RUN, "c", count=10, block_ms=1)
    assert [e for e, _ in first] == ids[:2] and [e for e, _ in rest] == ids[2:]


def test_invalid_entries_are_dead_lettered_and_acked(r):
    bus.ensure_group(r, ROLLOUTS)
    unstamped = sample().model_copy(update={"sample_id": ""})
    garbage = b"\xc1 not msgpack"
    bad_event = encode(GroupRejected(group_id="g", reason="x"))  # valid message, wrong kind
    ok0 = sid(bus.xadd(r, ROLLOUTS, sample()))
    bad = {
        sid(r.xadd(ROLLOUTS, {bus.FIELD: garbage})): ("not msgpack", garbage),
        sid(bus.xadd(r, ROLLOUTS, unstamped)): ("no sample_id", encode(unstamped)),
        sid(bus.xadd(r, ROLLOUTS, sample(member=1, tokens=(3, 16, 5)))): (
            "token id 16 outside the vocabulary (size 16)", None),
        sid(bus.xadd(r, ROLLOUTS, sample(member=1, tokens=tuple(range(1, 10))))): (
            "9 tokens exceed max_seq_len 8", None),
        sid(r.xadd(ROLLOUTS, {b"other": b"x"})): ("not msgpack", b""),
        sid(r.xadd(ROLLOUTS, {bus.FIELD: bad_event})): ("expected rollout_sample, got group_rejected",
                                                            bad_event),
    }
    ok1 = sid(bus.xadd(r, ROLLOUTS, sample(member=1)))

    got = reads.read_group(r, RUN, "c", count=100, block_ms=None, vocab_size=16, max_seq_len=8)
    assert [e for e, _ in got] == [ok0, ok1]
    assert pending_ids(r) == [ok0, ok1]  # bad entries were XACKed, valid ones stay pending
    assert bus.group_info(r, ROLLOUTS)["pending"] == 2

    dead = r.xrange(DEAD)
    assert len(dead) == len(bad)
    letters = [decode(fields[bus.FIELD], expect=DeadLetter) for _, fields in dead]
    assert [d.source_id for d in letters] == list(bad)  # in stream order
    for d in letters:
        needle, raw = bad[d.source_id]
        assert d.source_stream == ROLLOUTS
        assert needle in d.reason, (needle, d.reason)
        assert "\n" not in d.reason
        if raw is not None:
            assert d.raw == raw
        else:
            assert decode(d.raw) is not None  # the raw bytes are the original, decodable sample
    # nothing more to read, nothing is re-delivered
    assert reads.read_group(r, RUN, "c", count=100, block_ms=None, vocab_size=16, max_seq_len=8) == []


def test_boundaries_of_vocab_and_seq_len_are_inclusive(r):
    bus.ensure_group(r, ROLLOUTS)
    bus.xadd(r, ROLLOUTS, sample(tokens=(1, 2, 15)))
    got = reads.read_group(r, RUN, "c", count=10, block_ms=None, vocab_size=16, max_seq_len=3)
    assert len(got) == 1 and not r.exists(DEAD)


def test_dead_letter_raw_is_capped(r):
    bus.ensure_group(r, ROLLOUTS)
    r.xadd(ROLLOUTS, {bus.FIELD: b"\xc1" * 100_000})
    assert reads.read_group(r, RUN, "c", count=10, block_ms=None) == []
    (_, fields), = r.xrange(DEAD)
    assert len(decode(fields[bus.FIELD]).raw) == 65536


def test_decode_entries_without_group_does_not_ack(r):
    bus.ensure_group(r, ROLLOUTS)
    bad_id = sid(r.xadd(ROLLOUTS, {bus.FIELD: b"junk"}))
    r.xreadgroup(keys.TRAINER_GROUP, "c", {ROLLOUTS: ">"}, count=10)
    raw_entries = r.xrange(ROLLOUTS)
    assert reads.decode_entries(r, RUN, ROLLOUTS, raw_entries, group=None) == []
    assert r.xlen(DEAD) == 1
    assert pending_ids(r) == [bad_id]


def test_invalid_collects_only_stamped_samples_failing_vocab_or_length(r):
    bus.ensure_group(r, ROLLOUTS)
    out_of_vocab = sid(bus.xadd(r, ROLLOUTS, sample(tokens=(3, 16, 5))))
    too_long = sid(bus.xadd(r, ROLLOUTS, sample(member=1, tokens=tuple(range(1, 10)))))
    bus.xadd(r, ROLLOUTS, sample().model_copy(update={"sample_id": ""}))  # not stamped: no group to settle
    r.xadd(ROLLOUTS, {bus.FIELD: b"junk"})
    invalid: list = []
    assert reads.read_group(r, RUN, "c", count=10, block_ms=None, vocab_size=16, max_seq_len=8,
                              invalid=invalid) == []
    assert [(e, s.sample_id) for e, s in invalid] == [(out_of_vocab, sample().sample_id),
                                                      (too_long, sample(member=1).sample_id)]
    assert r.xlen(DEAD) == 4 and pending_ids(r) == []


def test_read_pending_pages_past_deleted_entries_and_acks_them(r):
    bus.ensure_group(r, ROLLOUTS)
    ids = [sid(bus.xadd(r, ROLLOUTS, sample(m // 2, m % 2))) for m in range(5)]
    reads.read_group(r, RUN, "c", count=10, block_ms=None)
    r.xdel(ROLLOUTS, *ids[:3])  # a whole first page of deleted entries
    entries, after = reads.read_pending(r, RUN, "c", "0", count=3)
    assert entries == [] and after == ids[2]  # not the end: page on
    assert [e for e, _ in reads.read_all_pending(r, RUN, "c", count=3)] == ids[3:]
    assert pending_ids(r) == ids[3:]  # the deleted ones were acked: they can never be trained


def test_dead_members_name_the_sample_and_group_of_stamped_samples(r):
    bus.ensure_group(r, ROLLOUTS)
    bus.xadd(r, ROLLOUTS, sample(tokens=(3, 16, 5)))
    r.xadd(ROLLOUTS, {bus.FIELD: b"junk"})
    long = sample(member=1, tokens=tuple([1] * 20_000))  # > 64 KiB encoded: its raw bytes are cut in the letter
    bus.xadd(r, ROLLOUTS, long)
    reads.read_group(r, RUN, "c", count=10, block_ms=None, vocab_size=16, max_seq_len=10_000)
    members = list(reads.dead_members(r, RUN, page=1))
    assert [(m.sample_id, m.group_id, m.group_size) for m in members] == [
        (s.sample_id, s.group_id, s.group_size) for s in (sample(), long)]


def test_rollout_stats(r):
    assert bus.rollout_stats(r, RUN) == {}
    r.hincrby(keys.rollout_stats(RUN), "invalid_samples", 3)
    r.hincrby(keys.rollout_stats(RUN), "rollout_failures", 1)
    assert bus.rollout_stats(r, RUN) == {"invalid_samples": 3, "rollout_failures": 1}


def test_count_connection_errors_is_zero_without_a_retry_policy(r):
    assert count_connection_errors(r)() == 0


# --------------------------------------------------------------------------- events


def events(n: int):
    out = []
    for i in range(n):
        out.append(GroupAdmitted(group_id=group_id_for(0, i, 0), row_index=i, epoch=0, attempt=0,
                                 submit_version=0, group_size=2))
    return out


def test_read_events_order_and_cursor(r):
    ev = keys.events(RUN)
    assert bus.read_events(r, RUN) == ([], "0-0")
    msgs = events(3) + [WeightsPublished(version=1, uri="u", sha256="s", bytes=1)]
    ids = [sid(bus.xadd(r, ev, m)) for m in msgs]
    got, cursor = bus.read_events(r, RUN)
    assert got == list(zip(ids, msgs))
    assert cursor == ids[-1]
    assert bus.read_events(r, RUN, cursor) == ([], cursor)
    # small pages: still reads until caught up, so a fold over the result is never partial
    part, c2 = bus.read_events(r, RUN, count=2)
    assert [e for e, _ in part] == ids and c2 == ids[-1]
    part, c3 = bus.read_events(r, RUN, ids[1], count=2)
    assert [e for e, _ in part] == ids[2:] and c3 == ids[-1]
    new = sid(bus.xadd(r, ev, RunFinished(reason="x")))
    got, c4 = bus.read_events(r, RUN, cursor, block_ms=1)
    assert [e for e, _ in got] == [new] and isinstance(got[0][1], RunFinished) and c4 == new


def test_undecodable_event_is_skipped_but_advances_the_cursor(r):
    ev = keys.events(RUN)
    a = sid(bus.xadd(r, ev, events(1)[0]))
    bad = sid(r.xadd(ev, {bus.FIELD: msgpack.packb({"kind": "nope", "schema_version": 1})}))
    got, cursor = bus.read_events(r, RUN)
    assert [e for e, _ in got] == [a]
    assert cursor == bad


def test_iter_all_events(r):
    ev = keys.events(RUN)
    assert list(bus.iter_all_events(r, RUN)) == []
    msgs = events(7)
    ids = []
    for i, m in enumerate(msgs):
        ids.append(sid(bus.xadd(r, ev, m)))
        if i == 3:
            r.xadd(ev, {bus.FIELD: b"garbage"})
    got = list(bus.iter_all_events(r, RUN, batch=2))
    assert [e for e, _ in got] == ids
    assert [m for _, m in got] == msgs


def test_iter_all_events_ends_on_trailing_garbage(r):
    ev = keys.events(RUN)
    bus.xadd(r, ev, events(1)[0])
    r.xadd(ev, {bus.FIELD: b"garbage"})
    assert len(list(bus.iter_all_events(r, RUN, batch=1))) == 1


def test_group_info_missing_stream_and_group(r):
    assert bus.group_info(r, "rl:none:rollouts") == {"pending": 0, "lag": None, "consumers": 0}
    bus.ensure_group(r, ROLLOUTS, group="someone-else")
    assert bus.group_info(r, ROLLOUTS) == {"pending": 0, "lag": None, "consumers": 0}
    assert bus.group_info(r, ROLLOUTS, group="someone-else")["pending"] == 0
