"""User hooks that fail must not crash-loop the trainer (docs/design.md §15.34 A failing user
hook rejects its group; a failing evaluation is recorded): a custom advantage or
dynamic_filter_fn that raises (or a filter answering NaN) rejects that group with the error as
its reason, which `rlstream audit` tallies, and training goes on; an evaluation_fn that raises
or returns non-finite values is logged and recorded as ``eval/failed``, and training goes on."""
from __future__ import annotations

import logging
import sys
import types
from functools import partial

import factories
import pytest
from factories import sample

from rlstream.core import bus, keys
from rlstream.core.messages import Evaluated, GroupAdmitted, GroupRejected, StepCommitted, group_id_for
from rlstream.core.metrics import read_metrics
from rlstream.ops.audit import audit_ledger
from rlstream.trainer.hooks import REASON_LIMIT, filter_keeps, hook_failed
from rlstream.trainer.trainer import Trainer

RUN = "hk"
pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group


@pytest.fixture
def hooks(monkeypatch):
    """A user module ``hookmod`` the config names as "hookmod:<function>"."""
    module = types.ModuleType("hookmod")

    def advantage(rewards_G):
        if rewards_G[1] == 2.0:  # row 1's group
            raise ZeroDivisionError("the user's advantage divided by zero " + "x" * 1000)
        return rewards_G - rewards_G.mean()

    def nan_advantage(rewards_G):
        return rewards_G * float("nan")

    def filter_fn(group):
        row = group.samples[0].row_index
        if row == 1:
            raise RuntimeError("filter bug")
        return float("nan") if row == 2 else True

    def raising_eval(ctx):
        raise KeyError("no such split")

    def nan_eval(ctx):
        return {"accuracy": float("nan")}

    for fn in (advantage, nan_advantage, filter_fn, raising_eval, nan_eval):
        setattr(module, fn.__name__, fn)
    monkeypatch.setitem(sys.modules, "hookmod", module)
    return module


config = partial(factories.config, run_id=RUN, max_steps=1, save_final_checkpoint=False)


def add_group(r, row: int) -> str:
    """Admit row ``row``; its rewards are (0, row + 1)."""
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0, submit_version=0,
                                                    group_size=2))
    for m, reward in enumerate([0.0, row + 1.0]):
        bus.xadd(r, keys.rollouts(RUN), sample(row, m, reward=reward))
    return gid


def events(r, kind=None) -> list:
    return [m for _, m in bus.iter_all_events(r, RUN) if kind is None or isinstance(m, kind)]


def rejections(r) -> dict[str, str]:
    return {m.group_id: m.reason for m in events(r, GroupRejected)}


def test_hook_errors_are_one_bounded_line_and_nan_is_no_keep():
    assert hook_failed("dynamic_filter_fn", ValueError("bad")) == "dynamic_filter_fn raised ValueError: bad"
    long = hook_failed("advantage", RuntimeError("y" * 5000))
    assert len(long) == REASON_LIMIT and long.endswith("...")
    assert filter_keeps(True) and filter_keeps(1) and not filter_keeps(False) and not filter_keeps(None)
    for answer in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="not a bool"):
            filter_keeps(answer)


def test_a_raising_advantage_rejects_its_group_and_training_goes_on(r, tmp_path, hooks):
    bad = add_group(r, 1)  # the advantage raises on it
    good = add_group(r, 0)
    t = Trainer(config(tmp_path, advantage="hookmod:advantage"), r, config(tmp_path).run_dir())
    assert t.run() == 1
    reason = rejections(r)[bad]
    assert reason.startswith("advantage 'hookmod:advantage' raised ZeroDivisionError: the user's advantage divided")
    assert len(reason) == REASON_LIMIT
    assert events(r, StepCommitted)[0].group_ids == [good]
    report = audit_ledger(events(r), [], job_exists=lambda gid: False)
    assert report.rejected == 1 and report.lost == []
    assert any(k.startswith("advantage 'hookmod:advantage' raised ZeroDivisionError") for k in report.rejected_reasons)


def test_a_non_finite_custom_advantage_rejects_its_group(r, tmp_path, hooks):
    gid = add_group(r, 0)
    t = Trainer(config(tmp_path, advantage="hookmod:nan_advantage"), r, config(tmp_path).run_dir())
    t.resume()
    t.buffer.collect()
    assert rejections(r) == {gid: "advantage is not finite for 2 sample(s)"}


def test_a_raising_or_nan_filter_rejects_its_group_and_training_goes_on(r, tmp_path, hooks):
    raising, nan, kept = add_group(r, 1), add_group(r, 2), add_group(r, 0)
    t = Trainer(config(tmp_path, dynamic_filter_fn="hookmod:filter_fn"), r, config(tmp_path).run_dir())
    assert t.run() == 1
    assert rejections(r) == {raising: "dynamic_filter_fn raised RuntimeError: filter bug",
                             nan: "dynamic_filter_fn raised ValueError: returned nan, not a bool"}
    (step,) = events(r, StepCommitted)
    assert step.group_ids == [kept]
    assert step.metrics["rollout/rejected_groups_total"] == 2  # failures, not filter decisions
    assert step.metrics["rollout/filter_reject_ratio"] == 0.0


@pytest.mark.parametrize("fn", ["raising_eval", "nan_eval"])
def test_a_failing_evaluation_is_recorded_and_training_goes_on(r, tmp_path, hooks, caplog, fn):
    add_group(r, 0)
    cfg = config(tmp_path, evaluation_fn=f"hookmod:{fn}")
    with caplog.at_level(logging.ERROR):
        assert Trainer(cfg, r, cfg.run_dir()).run() == 1
    assert [(e.version, e.metrics) for e in events(r, Evaluated)] == [(0, {"eval/failed": 1.0}),
                                                                      (1, {"eval/failed": 1.0})]
    assert [e["eval/failed"] for e in read_metrics(cfg.run_dir() / "metrics.jsonl", evaluations=True)] == [1.0, 1.0]
    assert "evaluation of v0 failed, training goes on: evaluation_fn raised" in caplog.text
    assert ("KeyError: 'no such split'" if fn == "raising_eval" else "non-finite 'accuracy'") in caplog.text
