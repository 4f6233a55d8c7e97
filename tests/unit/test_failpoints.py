"""The crash tests' failpoints (trainer/failpoints.py): one parse of ``RLSTREAM_FAULT`` for every
point, a comma-separated list of ``<point>:<step>``."""
from __future__ import annotations

from rlstream.trainer import failpoints
from rlstream.trainer.failpoints import FAULT_ENV, armed


def test_a_point_is_armed_only_at_its_step():
    env = {FAULT_ENV: "after_commit:4"}
    assert armed("after_commit", 4, env)
    assert not armed("after_commit", 40, env) and not armed("after_commit", 3, env)
    assert not armed("mid_archive", 4, env)
    assert not armed("after_commit", 4, {})


def test_several_points_in_one_variable():
    env = {FAULT_ENV: "mid_archive:6, after_trim:9"}
    assert armed("mid_archive", 6, env) and armed("after_trim", 9, env)
    assert not armed("mid_archive", 9, env) and not armed("after_trim", 6, env)


def test_unarmed_points_do_nothing(monkeypatch, tmp_path):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    failpoints.kill_self("after_commit", 1)  # still alive
    failpoints.kill_embedded_redis(tmp_path)  # no redis/pid file: nothing to kill
    assert list(failpoints.die_mid_write(iter([1]))) == [1]  # dies only once a second entry is due


def test_hang_before_backward_stops_only_the_named_rank_at_its_step(monkeypatch):
    import pytest
    import torch

    class Slept(Exception):
        pass

    def sleep(_):
        raise Slept

    monkeypatch.setattr(failpoints.time, "sleep", sleep)
    monkeypatch.setenv(FAULT_ENV, "hang_before_backward@1:2")
    layer, x = torch.nn.Linear(2, 2), torch.ones(1, 2)
    for rank, step in ((0, 2), (1, 1), (1, 3)):
        with failpoints.hang_before_backward(layer, step, rank):
            layer(x)
    with pytest.raises(Slept):
        with failpoints.hang_before_backward(layer, 2, 1):
            layer(x)  # the forward returns into a sleep that never ends
    layer(x)  # the hook is gone after the block
