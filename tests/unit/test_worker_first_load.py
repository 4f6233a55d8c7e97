"""A freshly (re)started worker whose first weights load fails because the version was
pruned meanwhile (``keep_weights``; seen in the chaos test, where restarted workers lag
behind a fast trainer) retries with the newest version instead of failing the job
(fakeredis, a fake policy)."""
from __future__ import annotations

import types

import fakeredis
import pytest

from rlstream.core import bus, keys
from rlstream.core.config import Config
from rlstream.core.messages import WeightsPublished
from rlstream.workers import runtime as runtime_mod
from rlstream.workers.runtime import WorkerRuntime

RUN = "fl"


def published(version: int) -> WeightsPublished:
    return WeightsPublished(version=version, uri=f"/weights/v{version}", sha256="0" * 64, bytes=0)


async def rollout_fn(row):
    return None


@pytest.fixture
def r():
    client = fakeredis.FakeRedis()
    yield client
    client.close()


def fake_make_policy(r, pruned: set[int]):
    def make(cfg, weights, device):
        if weights.version in pruned:
            bus.xadd(r, keys.events(RUN), published(weights.version + 1))  # the trainer moved on and pruned it
            raise OSError(f"{weights.uri}: no such directory")
        policy = types.SimpleNamespace(version=weights.version, tokenizer=None, vocab_size=16)
        return policy, types.SimpleNamespace(default_kwargs={})
    return make


def runtime(r) -> WorkerRuntime:
    return WorkerRuntime(Config(run_id=RUN), r, worker_id="w", device="cpu",
                         rollout_fn_factory=lambda setup: rollout_fn)


def test_first_load_of_a_pruned_version_retries_with_the_newest(r, monkeypatch):
    bus.xadd(r, keys.events(RUN), published(1))
    monkeypatch.setattr(runtime_mod, "make_policy", fake_make_policy(r, pruned={1}))
    rt = runtime(r)
    rt.sync_weights(1)
    assert rt.policy.version == 2


def test_a_missing_version_with_nothing_newer_still_fails(r, monkeypatch):
    bus.xadd(r, keys.events(RUN), published(1))

    def missing(cfg, weights, device):
        raise OSError("gone")

    monkeypatch.setattr(runtime_mod, "make_policy", missing)
    with pytest.raises(OSError, match="gone"):
        runtime(r).sync_weights(1)
