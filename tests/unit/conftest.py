"""Unit tests run on fakeredis: here ``r`` is a fresh in-process FakeRedis (its own server,
nothing shared between tests), in place of tests/conftest.py's client of the real
redis-server, which the integration tests use; ``one_thread`` pins torch to one thread for a
module of tiny forwards."""
from __future__ import annotations

import fakeredis
import pytest


@pytest.fixture
def r():
    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny forwards: a second thread only contends
    (docs/design.md §15.17 One torch thread per process). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
