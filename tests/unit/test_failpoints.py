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
