"""The trainer's steps run with the heap alive before them frozen out of the garbage
collector's scans (trainer.frozen_heap; docs/design.md §15.89 Weights link their unchanged
files; the steps run on a frozen heap): frozen while it steps, handed back to the collector when it
ends, however it ends."""
from __future__ import annotations

import gc
import weakref

import pytest
from test_trainer_resume import RUN, add_group, config  # noqa: F401 (RUN: the r_group fixture reads it)

from rlstream.trainer.trainer import YOUNG_THRESHOLD, Trainer, frozen_heap

pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group


def test_the_steps_run_on_a_frozen_heap_which_is_handed_back_at_the_end(r, tmp_path, monkeypatch):
    for row in range(2):
        add_group(r, row)
    cfg = config(tmp_path, max_steps=2)
    t = Trainer(cfg, r, cfg.run_dir())
    frozen, thresholds = [], gc.get_threshold()
    real = t.train_step
    monkeypatch.setattr(t, "train_step", lambda *a, **kw: frozen.append((gc.get_freeze_count(), gc.get_threshold()))
                        or real(*a, **kw))
    assert gc.get_freeze_count() == 0
    assert t.run() == 2
    assert len(frozen) == 2 and min(n for n, _ in frozen) > 1000  # torch's, transformers', the model's objects
    assert all(during == (YOUNG_THRESHOLD, *thresholds[1:]) for _, during in frozen)
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds


def test_a_step_that_fails_hands_the_heap_back_too(r, tmp_path, monkeypatch):
    add_group(r, 0)
    cfg = config(tmp_path, max_steps=2)
    t = Trainer(cfg, r, cfg.run_dir())

    def fails(*_, **__):
        assert gc.get_freeze_count() > 0
        raise RuntimeError("a step failed")

    monkeypatch.setattr(t, "train_step", fails)
    thresholds = gc.get_threshold()
    with pytest.raises(RuntimeError, match="a step failed"):
        t.run()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds


class Node:
    pass


def test_garbage_already_unreachable_is_collected_before_the_heap_is_frozen():
    """Else it would be frozen with the live objects, out of every collection until the steps end."""
    node = Node()
    node.self = node  # a garbage cycle once dropped
    ref = weakref.ref(node)
    del node
    with frozen_heap():
        gc.collect()
        assert ref() is None


def test_a_heap_frozen_already_is_left_as_it_was():
    """Nested (two trainers in one process) or frozen by the user's own ``gc.freeze()``: the
    inner one changes nothing and, at its end, does not unfreeze what the outer one froze."""
    with frozen_heap():
        frozen, thresholds = gc.get_freeze_count(), gc.get_threshold()
        with frozen_heap():
            pass
        # not unfrozen (frozen objects freed by reference count meanwhile leave the count a little lower)
        assert gc.get_freeze_count() > frozen * 0.9 and gc.get_threshold() == thresholds
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        mine, thresholds = gc.get_freeze_count(), gc.get_threshold()
        with frozen_heap():
            assert gc.get_threshold() == thresholds
        assert gc.get_freeze_count() > mine * 0.9
    finally:
        gc.unfreeze()


def test_a_rank_other_than_0_follows_on_a_frozen_heap_and_hands_it_back(monkeypatch):
    """Ranks other than 0 run rank 0's commands (``follow``) on a frozen heap too, unfrozen after."""
    import types

    from rlstream.trainer import trainer as trainer_module

    seen = []
    monkeypatch.setattr(trainer_module, "follow", lambda t: seen.append(gc.get_freeze_count()) or 7)
    assert gc.get_freeze_count() == 0
    assert Trainer.run(types.SimpleNamespace(ranks=types.SimpleNamespace(rank=1))) == 7
    assert seen[0] > 0 and gc.get_freeze_count() == 0
