"""Unit tests run on fakeredis: here ``r`` is a fresh in-process FakeRedis (its own server,
nothing shared between tests), in place of tests/conftest.py's client of the real
redis-server, which the integration tests use; ``r_group`` is that FakeRedis with the
trainer's consumer group; ``one_thread`` pins torch to one thread for a module of tiny
forwards."""
from __future__ import annotations

import fakeredis
import pytest

from rlstream.core import bus, keys


@pytest.fixture
def r():
    client = fakeredis.FakeRedis()
    yield client
    client.close()


@pytest.fixture
def r_group(r, request):
    """``r`` with the trainer's consumer group on the rollouts stream of the test module's
    ``RUN``, as the trainer creates it: what a trainer, or a test reading as one, needs. A
    module whose tests all use it says ``pytestmark = pytest.mark.usefixtures("r_group")`` and
    its tests take ``r``."""
    bus.ensure_group(r, keys.rollouts(request.module.RUN))
    return r


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
