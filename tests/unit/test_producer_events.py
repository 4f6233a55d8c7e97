"""rlstream.producers.producer.events_rolled_back on fakeredis: noticing that Redis lost the events
stream's tail (an OS crash with appendfsync everysec), even once new events were written."""
from __future__ import annotations

from factories import legacy_config

from rlstream.core import bus, keys
from rlstream.core.messages import DatasetExhausted
from rlstream.producers.producer import events_rolled_back

CFG = legacy_config(run_id="p1")


def add_events(r, n: int) -> list[str]:
    return [bus.xadd(r, keys.events(CFG.run_id), DatasetExhausted(groups=i)).decode() for i in range(n)]


def test_nothing_read_yet_is_never_a_rollback(r):
    assert not events_rolled_back(r, CFG, "0-0")


def test_cursor_still_present(r):
    ids = add_events(r, 3)
    assert not events_rolled_back(r, CFG, ids[-1])
    assert not events_rolled_back(r, CFG, ids[0])


def test_lost_tail_is_noticed_even_after_new_writes(r):
    ids = add_events(r, 3)
    cursor = ids[-1]
    r.xdel(keys.events(CFG.run_id), *ids[1:])  # the restarted server never had these
    add_events(r, 2)  # others wrote since: the stream's last id is past the cursor again
    assert events_rolled_back(r, CFG, cursor)


def test_stream_gone(r):
    assert events_rolled_back(r, CFG, "5-0")
