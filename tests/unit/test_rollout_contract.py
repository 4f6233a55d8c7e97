"""The user-facing contract: importable factories, rewards, keyword context, group retries,
the circuit breaker, preflight checks."""
from __future__ import annotations

import asyncio
import json
import types

import pytest
from factories import legacy_config, user_sample

from rlstream import RolloutSample, RolloutSetup, main
from rlstream.api import importable_spec
from rlstream.builtin.rewards import exact_match, final_number, math_answer, resolve_reward
from rlstream.core import bus, keys
from rlstream.core.config import BUILTIN_REWARDS
from rlstream.core.errors import ConfigError
from rlstream.core.messages import GroupJob, WeightsPublished
from rlstream.preflight import preflight
from rlstream.sampling.rollout_fn import accepted_context
from rlstream.workers.breaker import CircuitBreaker
from rlstream.workers.events import EventFollower
from rlstream.workers.runtime import CircuitOpen, WorkerRuntime


def module_level_factory(setup):  # importable by name, as workers need
    return None


def test_importable_spec_accepts_module_functions_and_strings():
    assert importable_spec(module_level_factory, "rollout_fn_factory") == \
        f"{module_level_factory.__module__}:module_level_factory"
    spec = "rlstream.builtin.rewards:math_answer"
    assert importable_spec(spec, "reward_fn") == spec


def test_importable_spec_rejects_lambdas_nested_and_main():
    with pytest.raises(ConfigError, match="lambda or a nested function"):
        importable_spec(lambda setup: None, "rollout_fn_factory")

    def nested(setup):
        return None

    with pytest.raises(ConfigError, match="nested function"):
        importable_spec(nested, "rollout_fn_factory")
    fake_main = type(module_level_factory)(module_level_factory.__code__, {"__name__": "__main__"})
    fake_main.__module__ = "__main__"
    with pytest.raises(ConfigError, match="__main__"):
        importable_spec(fake_main, "rollout_fn_factory")
    with pytest.raises(ConfigError, match="cannot import module"):
        importable_spec("no_such_module_abc:f", "evaluation_fn")


def test_main_rejects_a_bad_factory_before_starting_anything(tmp_path):
    with pytest.raises(ConfigError):
        main(legacy_config(log_path=str(tmp_path)), rollout_fn_factory="no_such_module_abc:make_rollout_fn")
    with pytest.raises(ConfigError):  # a factory of the script with only workers started by hand
        main(legacy_config(log_path=str(tmp_path), workers={"count": 0}), rollout_fn_factory=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_preflight_names_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        preflight(legacy_config(dataset=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1="}) + "\n{not json\n")
    with pytest.raises(ConfigError, match="bad.jsonl:2"):
        preflight(legacy_config(dataset=str(bad)))
    with pytest.raises(ConfigError, match="rollout_fn_factory"):
        preflight(legacy_config(rollout_fn_factory="no_such_module_abc:f"))
    with pytest.raises(ConfigError, match="base_model"):
        preflight(legacy_config(base_model=str(tmp_path)))


def test_weight_sync_interval_bounded_by_offpolicy_versions():
    legacy_config(max_head_offpolicy_versions=2, weight_sync_interval=3)
    with pytest.raises(ValueError, match="weight_sync_interval"):
        legacy_config(max_head_offpolicy_versions=1, weight_sync_interval=3)
    with pytest.raises(ValueError, match="weight_sync_interval"):
        legacy_config(synchronous_training=True, weight_sync_interval=2)


def test_rewards():
    assert exact_match(" 7", {"answer": "7"}) == 1.0 and exact_match("8", {"answer": "7"}) == 0.0
    assert final_number("so 3 + 4 = 7\n#### 1,234") == 1234.0
    assert final_number("no digits") is None
    assert math_answer("it is 15", {"answer": "8 + 7 = 15\n#### 15"}) == 1.0
    assert math_answer("it is 14", {"answer": "#### 15"}) == 0.0
    assert resolve_reward("rlstream.builtin.rewards:math_answer") is math_answer
    assert [resolve_reward(name) for name in BUILTIN_REWARDS] == [exact_match, math_answer]


def test_accepted_context():
    async def plain(sample_prompt):
        return None

    async def some(sample_prompt, row_index, evaluation=False):
        return None

    async def everything(sample_prompt, **kwargs):
        return None

    assert accepted_context(plain) == frozenset()
    assert accepted_context(some) == {"row_index", "evaluation"}
    assert accepted_context(everything) == {"row_index", "epoch", "sample_index", "evaluation"}


def runtime_with(rollout_fn, **cfg_overrides) -> WorkerRuntime:
    rt = WorkerRuntime(legacy_config(run_id="t", **cfg_overrides), r=None, worker_id="w", device="cpu",
                       rollout_fn_factory=lambda setup: rollout_fn, events=None)  # _group reads no events
    rt.rollout_fn, rt.context_params = rollout_fn, accepted_context(rollout_fn)
    return rt


def job(G: int = 4, row_index: int = 3) -> GroupJob:
    return GroupJob(run_id="t", group_id=f"e0-r{row_index}-a0", row_index=row_index, epoch=0, attempt=0,
                    submit_version=0, group_size=G, row={"prompt": "1+1="})


def test_group_redraws_missing_members_and_passes_declared_context():
    seen = []

    async def rollout_fn(sample_prompt, sample_index, row_index):
        seen.append((sample_index, row_index))
        return None if sample_index in (1, 2) else user_sample()  # draws 1 and 2 return None

    rt = runtime_with(rollout_fn, max_incomplete_group_retries=1)
    samples = asyncio.run(rt._group(job(4)))
    assert len(samples) == 4
    assert sorted(i for i, _ in seen) == [0, 1, 2, 3, 4, 5] and {r for _, r in seen} == {3}


def test_invalid_samples_are_counted_and_failures_retried():
    calls = {"n": 0}

    async def rollout_fn(sample_prompt):
        calls["n"] += 1
        if calls["n"] == 1:
            return RolloutSample(tokens=[1], logprobs=[0.0], loss_mask=[1], reward=1.0)  # invalid: < 2 tokens
        if calls["n"] == 2:
            raise RuntimeError("flaky tool")
        return user_sample()

    rt = runtime_with(rollout_fn, max_incomplete_group_retries=0, rollout_max_retries=2)
    samples = asyncio.run(rt._group(job(2)))
    assert rt.totals["invalid_samples"] == 1 and rt.totals["rollout_failures"] == 1
    assert len(samples) == 1  # the invalid draw is dropped, the failed one retried


def test_circuit_breaker_opens_on_consecutive_failures(r):
    """A rollout_fn that fails on every row stops the run after five groups of five rows;
    each group before is rejected with the error, not the run."""
    async def rollout_fn(sample_prompt):
        raise RuntimeError("the tool server is down")

    rt = runtime_with(rollout_fn, rollout_max_retries=10)
    rt.r, rt.events = r, EventFollower(r, "t", on_finished=lambda: None)
    bus.xadd(r, keys.events("t"), WeightsPublished(version=0, uri="/nowhere", sha256="0" * 64, bytes=0))
    rt.events.catch_up()
    rt.policy = types.SimpleNamespace(version=0, tokenizer=None)
    for row in range(4):
        assert rt.run_group(job(2, row))["rejected"].startswith("RuntimeError: the tool server is down")
    with pytest.raises(CircuitOpen, match="the tool server is down"):
        rt.run_group(job(2, 4))


def test_breaker_window_ratio():
    b = CircuitBreaker(min_rows=5, window=20, ratio=0.5)
    for i in range(19):
        b.record(ok=i % 2 == 0, row=i, error="x")
    assert not b.tripped  # window not full yet
    b.record(ok=False, row=19, error="x")
    assert b.tripped and "10 of the last 20" in b.reason()


def test_public_api_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys; from rlstream import Config, main, RolloutSample, RolloutSetup; "
            "assert 'torch' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    assert RolloutSetup.__dataclass_fields__.keys() >= {"sampler", "tokenizer", "sample_kwargs",
                                                        "completions_per_prompt", "extras"}


def test_a_broken_user_module_is_a_one_line_error(tmp_path, monkeypatch):
    (tmp_path / "broken_rollout_mod.py").write_text("def make_rollout_fn(setup):\n    return (\n")
    (tmp_path / "raising_rollout_mod.py").write_text("raise RuntimeError('needs an API key')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"importing module 'broken_rollout_mod' failed: SyntaxError"):
        importable_spec("broken_rollout_mod:make_rollout_fn", "rollout_fn_factory")
    with pytest.raises(ConfigError, match=r"RuntimeError: needs an API key; fix that module"):
        importable_spec("raising_rollout_mod:make_rollout_fn", "rollout_fn_factory")
