"""The trainer on fakeredis with the built-in tiny model: replay reproduces the original
steps, a checkpoint ahead of the events is skipped, lost XREADGROUP replies are picked up,
an all-invalid group settles, a run that trained nothing fails, metrics survive a resume."""
from __future__ import annotations

import logging
from functools import partial

import factories
import pytest
import torch
from factories import sample

from rlstream.core import bus, keys
from rlstream.core.messages import (
    DatasetExhausted,
    GroupAdmitted,
    GroupRejected,
    RunFinished,
    StepCommitted,
    group_id_for,
)
from rlstream.trainer.buffer import CONSUMER
from rlstream.trainer.checkpoint import checkpoint_dir, read_state
from rlstream.trainer.step_metrics import rejected_total
from rlstream.trainer.trainer import Trainer

RUN = "tr"
pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group


# O = 1 (the default before the cookbook's strict on-policy one): groups admitted at v0 stay
# trainable for two steps, and no producer here admits more.
config = partial(factories.config, run_id=RUN, max_steps=2, lr_schedule="linear", max_head_offpolicy_versions=1)


def admit(r, row: int, group_size: int = 2) -> str:
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0,
                                                    submit_version=0, group_size=group_size))
    return gid


def add_group(r, row: int, group_size: int = 2, token: int = 3) -> list[str]:
    """Admit row ``row`` and XADD its samples (rewards 0, 1, ...: a finite, nonzero advantage)."""
    admit(r, row, group_size)
    return [bus.xadd(r, keys.rollouts(RUN), sample(row, m, tokens=(1, 2 + m, token), group_size=group_size)).decode()
            for m in range(group_size)]


def params(t: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in t.model.parameters()]


def events(r, kind) -> list:
    return [m for _, m in bus.iter_all_events(r, RUN) if isinstance(m, kind)]


def test_replay_uses_the_recorded_lr_and_reproduces_the_weights(r, tmp_path, caplog):
    for row in range(2):
        add_group(r, row)
    first = Trainer(config(tmp_path), r, config(tmp_path).run_dir())
    assert first.run() == 2
    metrics = [m.metrics for m in events(r, StepCommitted)]
    assert metrics[0]["train/lr"] != metrics[1]["train/lr"]  # linear decay over max_steps=2
    assert metrics[1]["rollout/invalid_samples_total"] == 0 and metrics[1]["rollout/failures_total"] == 0

    # Extending the run changes the schedule; replay must still use the LR each step used.
    cfg = config(tmp_path, max_steps=50, save_final_checkpoint=False)
    for path in (tmp_path / RUN / "checkpoints").glob("step-*"):
        path.rename(path.with_name("old-" + path.name))  # no checkpoint: replay both steps
    again = Trainer(cfg, r, cfg.run_dir())
    with caplog.at_level(logging.WARNING):
        again.resume()
    assert (again.step, again.version) == (2, 2)
    assert all(torch.equal(a, b) for a, b in zip(params(first), params(again)))
    assert "replay of step" not in caplog.text  # the losses matched


def test_checkpoint_ahead_of_the_events_is_skipped_then_replaced(r, tmp_path, caplog):
    for row in range(2):
        add_group(r, row)
    cfg = config(tmp_path, dcp_save_interval=1)
    assert Trainer(cfg, r, cfg.run_dir()).run() == 2
    # An OS crash loses Redis's last second: step 2's commit (and the record) but not the fsynced checkpoint.
    ids = {m.step: i for i, m in bus.iter_all_events(r, RUN) if isinstance(m, StepCommitted)}
    tail = [i for i, _ in bus.iter_all_events(r, RUN) if i >= ids[2]]
    r.xdel(keys.events(RUN), *tail)
    r.hset(keys.committed_step(RUN), mapping={"step": 1, "event_id": ids[1]})

    t = Trainer(config(tmp_path, dcp_save_interval=1, max_steps=3), r, cfg.run_dir())
    with caplog.at_level(logging.WARNING):
        t.resume()
    assert t.step == 1 and "skipping checkpoint" in caplog.text and "step-2" in caplog.text
    add_group(r, 2)
    while not t.buffer.ready:
        t.buffer.collect()
    t.train_step(t.buffer.ready[:1], wait_time=0.0)
    new_id = next(i for i, m in bus.iter_all_events(r, RUN) if isinstance(m, StepCommitted) and m.step == 2)
    assert new_id != ids[2]
    assert read_state(checkpoint_dir(cfg.run_dir(), 2)).events_cursor == new_id  # the stale one was replaced


def test_entries_of_a_lost_reply_are_picked_up_and_held_ones_left_alone(r, tmp_path):
    cfg = config(tmp_path)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    held = add_group(r, 0)
    t.buffer.collect()
    assert [g.group_id for g in t.buffer.ready] == [group_id_for(0, 0, 0)]
    lost = add_group(r, 1)
    r.xreadgroup(keys.TRAINER_GROUP, CONSUMER, {keys.rollouts(RUN): ">"})  # delivered, reply never seen
    t.buffer.collect()
    assert len(t.buffer.ready) == 1  # not due yet: no connection error, last rescan just now
    t.buffer.connection_errors = lambda: 1  # the client retried through a connection error
    t.buffer.collect()
    assert [g.entry_ids for g in t.buffer.ready] == [held, lost]
    pending = {e["message_id"].decode() for e in r.xpending_range(keys.rollouts(RUN), keys.TRAINER_GROUP, "-", "+", 10)}
    assert pending == set(held + lost)  # nothing held was acked as a duplicate


def test_idle_rescan_is_periodic(r, tmp_path):
    cfg = config(tmp_path)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    add_group(r, 0)
    r.xreadgroup(keys.TRAINER_GROUP, CONSUMER, {keys.rollouts(RUN): ">"})
    t.buffer.last_rescan -= 11.0
    t.buffer.collect()
    assert len(t.buffer.ready) == 1


def test_a_run_whose_every_group_is_invalid_fails_with_a_reason(r, tmp_path):
    add_group(r, 0, token=99)  # outside the tiny model's vocabulary: both samples dead-lettered
    bus.xadd(r, keys.events(RUN), DatasetExhausted(groups=1))
    cfg = config(tmp_path, max_steps=None, lr_schedule="constant")
    assert Trainer(cfg, r, cfg.run_dir()).run() == 0
    (rejected,) = events(r, GroupRejected)
    assert rejected.reason.startswith("incomplete: 0 of 2 samples valid, 2 dead-lettered")
    (finished,) = events(r, RunFinished)
    assert finished.failed and finished.reason.startswith("no step was trained") and f"audit {RUN}" in finished.reason


def test_a_restarted_trainer_settles_groups_from_the_dead_letter_stream(r, tmp_path):
    add_group(r, 0, token=99)
    cfg = config(tmp_path)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    t.buffer.collect()
    assert group_id_for(0, 0, 0) in t.state.rejected
    r.delete(keys.events(RUN))  # as if the rejection never happened: a fresh trainer must find it again
    admit(r, 0)
    t.lease.release()  # the first trainer stopped
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    t.buffer.collect()
    assert group_id_for(0, 0, 0) in t.state.rejected


def test_rejected_groups_total_survives_a_resume(r, tmp_path):
    gid = admit(r, 7)
    bus.xadd(r, keys.events(RUN), GroupRejected(group_id=gid, reason="rollout job failed", by="producer"))
    bus.xadd(r, keys.events(RUN), GroupRejected(group_id="x", reason="dynamic_filter_fn", by="trainer"))
    add_group(r, 0)
    cfg = config(tmp_path, max_steps=1)
    t = Trainer(cfg, r, cfg.run_dir())
    t.run()
    (step,) = events(r, StepCommitted)
    assert step.metrics["rollout/rejected_groups_total"] == 1 == rejected_total(t.state)
