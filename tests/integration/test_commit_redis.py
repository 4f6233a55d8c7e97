"""rlstream.trainer.commit's Lua commit against a real redis-server: idempotent under the client's
retry (a reply lost after the script ran), refused out of order, refused with nothing written
to a trainer without the lease or when Redis lost what the trainer read (entries no longer
pending, the last folded event gone), and the client-side observations the trainer relies on
after a connection error."""
from __future__ import annotations

import threading

import factories
import pytest

from rlstream.core import bus, keys
from rlstream.core.connection import connect, count_connection_errors
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import DatasetExhausted, RolloutRecord, StepCommitted
from rlstream.trainer import reads
from rlstream.trainer.commit import commit_step, sync_committed_step
from rlstream.trainer.lease import TrainerLease

pytestmark = pytest.mark.integration


@pytest.fixture
def lease(r, run_id):
    """The run's trainer lease, held by the test as the trainer."""
    held = TrainerLease(r, run_id)
    held.hold()
    yield held
    held.release()


def sample(i: int) -> RolloutRecord:
    """The ``i``-th sample written: member ``i % 2`` of row ``i // 2``."""
    return factories.sample(i // 2, i % 2, reward=float(i))


def delivered(r, run_id: str, n: int, start: int = 0) -> list[str]:
    """Add ``n`` samples and read them as the trainer: they are pending."""
    bus.ensure_group(r, keys.rollouts(run_id))
    for i in range(start, start + n):
        bus.xadd(r, keys.rollouts(run_id), sample(i))
    return [e for e, _ in reads.read_group(r, run_id, "trainer-0", count=100, block_ms=None)]


def step(n: int, entry_ids: list[str], **metrics) -> StepCommitted:
    return StepCommitted(step=n, version=n, entry_ids=entry_ids, sample_ids=[f"s{e}" for e in entry_ids],
                         group_ids=[f"g{n}"], metrics=metrics or {"train/loss": 0.5})


def committed_steps(r, run_id: str) -> list[int]:
    return [m.step for _, m in bus.iter_all_events(r, run_id) if isinstance(m, StepCommitted)]


def test_commit_twice_writes_one_event(r, run_id, lease):
    ids = delivered(r, run_id, 4)
    first = commit_step(r, run_id, step(1, ids), lease)
    again = commit_step(r, run_id, step(1, ids), lease)  # what the client's retry re-sends after a lost reply
    assert again == first
    assert committed_steps(r, run_id) == [1]
    assert bus.group_info(r, keys.rollouts(run_id))["pending"] == 0
    assert r.hget(keys.committed_step(run_id), "step") == b"1"


def test_retry_after_a_restart_finds_the_commit_without_the_script_cache(r, run_id, lease):
    ids = delivered(r, run_id, 2)
    first = commit_step(r, run_id, step(1, ids), lease)
    r.script_flush()  # a restarted redis-server has no scripts: EVALSHA -> NOSCRIPT -> reload
    assert commit_step(r, run_id, step(1, ids), lease) == first
    assert committed_steps(r, run_id) == [1]


def test_commit_for_a_wrong_step_is_refused(r, run_id, lease):
    ids = delivered(r, run_id, 4)
    with pytest.raises(RlstreamError, match="commit of step 2 refused.*committed step 0, not 1"):
        commit_step(r, run_id, step(2, ids), lease)
    commit_step(r, run_id, step(1, ids[:2]), lease)
    with pytest.raises(RlstreamError, match="Another trainer is running"):
        commit_step(r, run_id, step(1, ids[2:]), lease)  # step 1 again, other samples: a second trainer
    with pytest.raises(RlstreamError, match="committed step 1, not 2"):
        commit_step(r, run_id, step(3, ids[2:]), lease)
    assert committed_steps(r, run_id) == [1]
    assert bus.group_info(r, keys.rollouts(run_id))["pending"] == 2  # refused commits ack nothing
    commit_step(r, run_id, step(2, ids[2:]), lease)
    assert committed_steps(r, run_id) == [1, 2]


def test_commit_without_the_consumer_group_writes_nothing(r, run_id, lease):
    entries = delivered(r, run_id, 2)
    r.xgroup_destroy(keys.rollouts(run_id), keys.TRAINER_GROUP)
    with pytest.raises(RlstreamError, match="refused, nothing written.*consumer group is gone"):
        commit_step(r, run_id, step(1, entries), lease)
    assert committed_steps(r, run_id) == []
    assert r.hget(keys.committed_step(run_id), "step") is None


def test_commit_acks_more_entries_than_one_lua_unpack(r, run_id, lease):
    stream = keys.rollouts(run_id)
    bus.ensure_group(r, stream)
    with r.pipeline(transaction=False) as pipe:
        for i in range(2502):
            bus.xadd(pipe, stream, sample(i))
        pipe.execute()
    many = [e.decode() for e, _ in r.xreadgroup(keys.TRAINER_GROUP, "trainer-0", {stream: ">"})[0][1]]
    assert len(many) == 2502  # all pending: the commit checks each before acking any
    commit_step(r, run_id, step(1, many), lease)
    assert bus.group_info(r, keys.rollouts(run_id))["pending"] == 0


def nothing_written(r, run_id: str, pending: int) -> None:
    assert committed_steps(r, run_id) == []
    assert r.hget(keys.committed_step(run_id), "step") is None
    assert bus.group_info(r, keys.rollouts(run_id))["pending"] == pending


def test_commit_without_the_lease_writes_nothing(r, run_id, lease):
    ids = delivered(r, run_id, 2)
    r.set(keys.trainer_lease(run_id), "other-trainer")  # this one's lease lapsed; another took over
    with pytest.raises(RlstreamError, match="commit of step 1 refused, nothing written: lost the trainer lease of "
                                            f"run {run_id} to other-trainer: another trainer took over"):
        commit_step(r, run_id, step(1, ids), lease)
    nothing_written(r, run_id, pending=2)
    assert lease.lost_to == "other-trainer"
    with pytest.raises(RlstreamError, match="lost the trainer lease"):
        sync_committed_step(r, run_id, 1, "1-0", lease)
    nothing_written(r, run_id, pending=2)


def test_commit_of_entries_redis_no_longer_holds_pending_writes_nothing(r, run_id, lease):
    ids = delivered(r, run_id, 4)
    # Redis came back without its last writes: two delivered entries are gone from the
    # pending list (here: acked and deleted behind the trainer's back).
    r.xack(keys.rollouts(run_id), keys.TRAINER_GROUP, *ids[2:])
    r.xdel(keys.rollouts(run_id), *ids[2:])
    never = "99999999999999-0"  # never delivered at all
    with pytest.raises(RlstreamError, match=f"commit of step 1 refused, nothing written: 3 of the 5 rollouts entries "
                                            f"it trained on are not pending .*{ids[2]} {ids[3]} {never}"):
        commit_step(r, run_id, step(1, ids + [never]), lease)
    nothing_written(r, run_id, pending=2)


def test_commit_after_the_events_lost_their_tail_writes_nothing(r, run_id, lease):
    ids = delivered(r, run_id, 2)
    folded = bus.xadd(r, keys.events(run_id), DatasetExhausted(groups=1)).decode()
    r.xdel(keys.events(run_id), folded)  # the trainer folded it; the restarted Redis never had it
    with pytest.raises(RlstreamError, match=f"refused, nothing written: event {folded}, the last this trainer "
                                            "folded, is gone from the events stream"):
        commit_step(r, run_id, step(1, ids), lease, last_event=folded)
    nothing_written(r, run_id, pending=2)
    commit_step(r, run_id, step(1, ids), lease, last_event="0-0")  # nothing folded yet: nothing to check
    assert committed_steps(r, run_id) == [1]


def test_sync_raises_a_missing_or_lower_record_and_never_lowers_it(r, run_id, lease):
    assert sync_committed_step(r, run_id, 3, "5-0", lease) == -1  # a run from before the record existed
    ids = delivered(r, run_id, 2)
    commit_step(r, run_id, step(4, ids), lease)
    assert sync_committed_step(r, run_id, 2, "1-0", lease) == 4
    assert r.hget(keys.committed_step(run_id), "step") == b"4"


def test_connection_errors_are_counted_through_the_clients_retries(redis_url, run_id):
    r, killer = connect(redis_url), connect(redis_url)
    bus.ensure_group(r, keys.rollouts(run_id))
    try:
        errors = count_connection_errors(r)
        victim = r.client_id()
        assert errors() == 0
        # Kill the connection while it blocks in XREADGROUP: the client retries the read.
        timer = threading.Timer(0.3, killer.client_kill_filter, kwargs={"_id": victim})
        timer.start()
        assert reads.read_group(r, run_id, "trainer-0", count=10, block_ms=1500) == []
        timer.join()
        assert errors() == 1
    finally:
        r.close()
        killer.close()


def test_read_all_pending_acks_deleted_entries(r, run_id):
    ids = delivered(r, run_id, 5)
    r.xdel(keys.rollouts(run_id), *ids[:3])
    assert [e for e, _ in reads.read_all_pending(r, run_id, "trainer-0", count=3)] == ids[3:]
    assert bus.group_info(r, keys.rollouts(run_id))["pending"] == 2


def test_read_unheld_pending_fetches_only_what_is_not_held(r, run_id):
    ids = delivered(r, run_id, 6)
    r.xdel(keys.rollouts(run_id), ids[5])  # pending, payload gone: acked, never returned
    got = reads.read_unheld_pending(r, run_id, "trainer-0", held=set(ids[:3]), page=2)
    assert [e for e, _ in got] == ids[3:5]
    pending = [row["message_id"].decode() for row in
               r.xpending_range(keys.rollouts(run_id), keys.TRAINER_GROUP, "-", "+", 10)]
    assert pending == ids[:5]


def test_commit_checks_entries_past_the_first_page_of_their_span(r, run_id, lease):
    """The script reads the pending rows of the span the step's ids cover, two per id; entries the
    page does not reach (other pending entries between them) are checked one by one, and a
    missing one among them still refuses the commit."""
    ids = delivered(r, run_id, 40)
    step_ids = ids[::8]  # 5 entries spread over 33 pending ones: the page of 10 rows reaches 2 of them
    r.xack(keys.rollouts(run_id), keys.TRAINER_GROUP, step_ids[-1])  # gone from the pending list
    with pytest.raises(RlstreamError, match=f"1 of the 5 rollouts entries .*not pending .*{step_ids[-1]}"):
        commit_step(r, run_id, step(1, step_ids), lease)
    nothing_written(r, run_id, pending=39)
    commit_step(r, run_id, step(1, step_ids[:-1]), lease)
    assert bus.group_info(r, keys.rollouts(run_id))["pending"] == 35


def test_commit_refuses_ids_that_are_not_stream_ids(r, run_id, lease):
    ids = delivered(r, run_id, 2)
    for bad in ([ids[0] + " " + ids[1]], ["", *ids]):  # ids travel space-separated: these would not
        with pytest.raises(RlstreamError, match="refused, nothing written: .*space-separated ids for"):
            commit_step(r, run_id, step(1, bad), lease)
    nothing_written(r, run_id, pending=2)
