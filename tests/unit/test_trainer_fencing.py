"""The trainer on fakeredis with the built-in tiny model, fenced (docs/design.md §15.36 A trainer
lease fences every trainer write; §15.37 The commit checks that Redis kept what the trainer
read): a standby reads and writes nothing and exits when the run finishes; a trainer restarted
while its killed predecessor's lease lives takes over once it lapses; once another trainer
holds the lease every write is refused and nothing is written; a trainer whose Redis lost
events it had folded, or entries it trained on, stops instead of committing."""
from __future__ import annotations

import pytest
from test_trainer_resume import RUN, add_group, config, events

from rlstream.core import bus, keys
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import DatasetExhausted, GroupRejected, RunFinished, StepCommitted, WeightsPublished
from rlstream.trainer.commit import publish
from rlstream.trainer.trainer import Trainer

LOST = f"lost the trainer lease of run {RUN} to usurper: another trainer took over this run; this one stops"
pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group


def pending(r) -> int:
    return bus.group_info(r, keys.rollouts(RUN))["pending"]


def test_a_standby_reads_and_writes_nothing_and_exits_when_the_run_finishes(r, tmp_path):
    add_group(r, 0)
    r.set(keys.trainer_lease(RUN), "first-trainer", px=60_000)
    bus.xadd(r, keys.events(RUN), RunFinished(reason="max_steps", step=0, version=0))
    written = r.xlen(keys.events(RUN))
    cfg = config(tmp_path)
    t = Trainer(cfg, r, cfg.run_dir())
    assert t.run() == 0
    assert pending(r) == 0 and r.xlen(keys.events(RUN)) == written  # nothing read from the rollouts, nothing written
    assert r.get(keys.trainer_lease(RUN)) == b"first-trainer" and not r.exists(keys.committed_step(RUN))
    assert not (cfg.run_dir() / "weights").exists()


def test_a_restarted_trainer_takes_over_once_the_killed_ones_lease_lapses(r, tmp_path):
    add_group(r, 0)
    r.set(keys.trainer_lease(RUN), "killed-trainer", px=300)
    cfg = config(tmp_path, max_steps=1)
    assert Trainer(cfg, r, cfg.run_dir()).run() == 1
    assert [m.step for m in events(r, StepCommitted)] == [1]
    assert not r.exists(keys.trainer_lease(RUN))  # released when it stopped: a successor starts at once


def ready_trainer(r, tmp_path, **over) -> Trainer:
    cfg = config(tmp_path, **over)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    add_group(r, 0)
    while not t.buffer.ready:
        t.buffer.collect()
    return t


def test_a_commit_after_another_trainer_took_over_writes_nothing(r, tmp_path):
    t = ready_trainer(r, tmp_path, weight_sync_interval=0)
    r.set(keys.trainer_lease(RUN), "usurper")
    with pytest.raises(RlstreamError, match=f"commit of step 1 refused, nothing written: {LOST}"):
        t.train_step(t.buffer.ready[:1], wait_time=0.0)
    assert events(r, StepCommitted) == [] and pending(r) == 2


def test_every_other_trainer_write_is_fenced(r, tmp_path):
    t = ready_trainer(r, tmp_path)
    (group,) = t.buffer.ready
    r.set(keys.trainer_lease(RUN), "usurper")
    written = r.xlen(keys.events(RUN))
    with pytest.raises(RlstreamError, match=LOST):
        t.buffer.reject(group, "a reason")
    with pytest.raises(RlstreamError, match=LOST):
        t.buffer.add_samples([(group.entry_ids[0], group.samples[0])])  # a duplicate: acked untrained
    with pytest.raises(RlstreamError, match=LOST):
        publish(r, RUN, WeightsPublished(version=1, uri="x", sha256="0" * 64, bytes=1), t.lease)
    with pytest.raises(RlstreamError, match=LOST):
        t.write_weights()
    with pytest.raises(RlstreamError, match=LOST):
        t.finish("max_steps")
    with pytest.raises(RlstreamError, match=LOST):
        t.buffer.collect()  # and it stops at its next read
    assert r.xlen(keys.events(RUN)) == written and pending(r) == 2
    assert events(r, GroupRejected) == [] and events(r, RunFinished) == []
    assert not (t.run_dir / "weights" / "v1").exists()


def test_a_commit_of_entries_redis_lost_is_refused(r, tmp_path):
    t = ready_trainer(r, tmp_path)
    (group,) = t.buffer.ready
    r.xack(keys.rollouts(RUN), keys.TRAINER_GROUP, *group.entry_ids)  # gone with Redis's lost tail
    with pytest.raises(RlstreamError, match="refused, nothing written: 2 of the 2 rollouts entries it trained on are "
                                            "not pending"):
        t.train_step([group], wait_time=0.0)
    assert events(r, StepCommitted) == []


@pytest.mark.parametrize("noticed_by", ["a connection error", "the periodic check"])
def test_the_trainer_stops_when_redis_lost_events_it_had_folded(r, tmp_path, noticed_by):
    cfg = config(tmp_path)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    t.buffer.collect()
    folded = t.cursor
    r.xdel(keys.events(RUN), folded)  # the restarted Redis never had it...
    bus.xadd(r, keys.events(RUN), DatasetExhausted(groups=1))  # ...and has been written to since
    if noticed_by == "a connection error":
        t.rollback.connection_errors = lambda: 1  # the client retried through one (a restart, a failover)
    else:
        t.rollback.last_check -= 60.0
    with pytest.raises(RlstreamError, match=f"Redis lost the tail of run {RUN}'s events stream: event {folded}, "
                                            "which this trainer had read, is gone"):
        t.buffer.collect()
