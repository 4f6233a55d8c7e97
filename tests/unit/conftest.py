"""Unit tests run on fakeredis: here ``r`` is a fresh in-process FakeRedis (its own server,
nothing shared between tests), in place of tests/conftest.py's client of the real
redis-server, which the integration tests use."""
from __future__ import annotations

import fakeredis
import pytest


@pytest.fixture
def r():
    client = fakeredis.FakeRedis()
    yield client
    client.close()
