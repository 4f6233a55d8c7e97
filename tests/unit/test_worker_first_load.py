"""A freshly (re)started worker whose first weights load fails because the version was
pruned meanwhile (``keep_weights``; seen in the chaos test, where restarted workers lag
behind a fast trainer) waits for the next weights published instead of failing the job;
with nothing newer, the job fails once ``job_timeout`` is spent, naming the version that
would not load (fakeredis, a fake policy)."""
from __future__ import annotations

import types

import pytest
from factories import legacy_config

from rlstream.core import bus, keys
from rlstream.core.messages import WeightsPublished
from rlstream.workers import runtime as runtime_mod
from rlstream.workers.events import EventFollower
from rlstream.workers.runtime import WorkerRuntime

RUN = "fl"


def published(version: int) -> WeightsPublished:
    return WeightsPublished(version=version, uri=f"/weights/v{version}", sha256="0" * 64, bytes=0)


async def rollout_fn(row):
    return None


def fake_make_policy(r, events: EventFollower, pruned: set[int]):
    def make(cfg, weights, device):
        if weights.version in pruned:
            bus.xadd(r, keys.events(RUN), published(weights.version + 1))  # the trainer moved on and pruned it
            events.catch_up()  # what the follower thread would do
            raise OSError(f"{weights.uri}: no such directory")
        policy = types.SimpleNamespace(version=weights.version, tokenizer=None, vocab_size=16)
        return policy, types.SimpleNamespace(default_kwargs={})
    return make


def runtime(r) -> WorkerRuntime:
    events = EventFollower(r, RUN, on_finished=lambda: None)  # not started: the test drives catch_up
    events.catch_up()
    return WorkerRuntime(legacy_config(run_id=RUN, job_timeout=5), r, worker_id="w", device="cpu",
                         rollout_fn_factory=lambda setup: rollout_fn, events=events)


def test_first_load_of_a_pruned_version_retries_with_the_newest(r, monkeypatch):
    bus.xadd(r, keys.events(RUN), published(1))
    rt = runtime(r)
    monkeypatch.setattr(runtime_mod, "make_policy", fake_make_policy(r, rt.events, pruned={1}))
    rt.sync_weights(1)
    assert rt.policy.version == 2


def test_a_missing_version_with_nothing_newer_still_fails(r, monkeypatch):
    bus.xadd(r, keys.events(RUN), published(1))

    def missing(cfg, weights, device):
        raise OSError("gone")

    monkeypatch.setattr(runtime_mod, "make_policy", missing)
    with pytest.raises(TimeoutError, match=r"v1 at /weights/v1 could not be loaded"):
        runtime(r).sync_weights(1)
