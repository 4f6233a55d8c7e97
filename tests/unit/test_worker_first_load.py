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


def test_a_pruned_version_is_named_as_pruned_not_as_the_loaders_error(r, monkeypatch, tmp_path, caplog):
    """transformers reports a missing local path as a malformed hub repo id ("Repo id must be in
    the form ..."): the worker says the version was pruned and which is the newest on disk."""
    from rlstream.core import weights

    bus.xadd(r, keys.events(RUN), published(1))
    events = EventFollower(r, RUN, on_finished=lambda: None)
    events.catch_up()
    rt = WorkerRuntime(legacy_config(run_id=RUN, job_timeout=5, log_path=str(tmp_path), keep_weights=2), r,
                       worker_id="w", device="cpu", rollout_fn_factory=lambda setup: rollout_fn, events=events)
    for v in (2, 3):  # v1 is gone, the trainer kept the newest two
        directory = weights.version_dir(rt.cfg.run_dir() / "weights", v)
        directory.mkdir(parents=True)
        (directory / weights.MANIFEST).write_text("{}")

    def hub_error(cfg, published_weights, device):
        if published_weights.version == 1:
            bus.xadd(r, keys.events(RUN), published(3))  # the trainer moved on and pruned v1
            events.catch_up()
            raise ValueError("Repo id must be in the form 'repo_name' or 'namespace/repo_name'")
        return types.SimpleNamespace(version=published_weights.version, tokenizer=None, vocab_size=16), \
            types.SimpleNamespace(default_kwargs={})

    monkeypatch.setattr(runtime_mod, "make_policy", hub_error)
    with caplog.at_level("WARNING"):
        rt.sync_weights(1)
    assert rt.policy.version == 3
    assert "v1 was pruned before this worker loaded it (keep_weights = 2" in caplog.text
    assert "the newest on disk is v3" in caplog.text and "Repo id" not in caplog.text.split("v1 was pruned")[1][:200]
