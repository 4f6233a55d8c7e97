"""evaluation_fn results, ctx.rollout_fn (the run's rollout_fn over the evaluation sampler,
called with evaluation=True), and W&B logging through a stand-in module (wandb is optional)."""
from __future__ import annotations

import asyncio
import sys
import types

import pytest
from factories import legacy_config

from rlstream.core.config import Config
from rlstream.core.errors import ConfigError
from rlstream.core.rollout import Completion, RolloutSample
from rlstream.trainer.hooks import EvaluationContext, load_evaluation, run_evaluation
from rlstream.trainer.wandb_log import make_logger


def ctx() -> EvaluationContext:
    return EvaluationContext(sampler=None, tokenizer=None, version=3, step=3, sample_kwargs={})


def test_run_evaluation_sync_and_async():
    assert run_evaluation(lambda c: {"acc": c.version / 6}, ctx()) == {"eval/acc": 0.5}

    async def async_eval(c):
        return {"acc": 1}

    assert run_evaluation(async_eval, ctx()) == {"eval/acc": 1.0}
    with pytest.raises(TypeError, match="dict"):
        run_evaluation(lambda c: 0.5, ctx())
    with pytest.raises(ValueError, match="non-finite"):
        run_evaluation(lambda c: {"acc": float("nan")}, ctx())


def test_wandb_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    assert make_logger(legacy_config(run_id="r")) is None
    with pytest.raises(ConfigError, match="pip install wandb"):
        make_logger(legacy_config(run_id="r", wandb={"project": "p"}))


def test_wandb_logs_each_step(monkeypatch):
    logged, calls = [], {}

    class Run:
        def log(self, metrics, step):
            logged.append((step, metrics))

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.update(init=kw) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = make_logger(legacy_config(run_id="r1", wandb={"project": "p"}))
    logger.log({"step": 2, "train/loss": 0.5})
    logger.finish()
    assert calls["init"]["project"] == "p" and calls["init"]["name"] == "r1" and calls["init"]["mode"] == "offline"
    assert logged == [(2, {"train/loss": 0.5})] and calls["finished"]


class FakeSampler:
    """Answers every prompt with token 7 (logprob -0.5), recording the calls."""

    def __init__(self):
        self.calls = []

    async def sample_with_prompt_tokens(self, prompt, n=1, **kwargs):
        self.calls.append((list(prompt), kwargs))
        return [Completion(full_tokens=list(prompt) + [7], prompt_len=len(prompt), inference_logprobs=[-0.5],
                           finish_reason="stop", text="7", version=0) for _ in range(n)]


@pytest.fixture
def user_module(monkeypatch):
    """A stand-in user module ``evalmod``: a factory whose rollout_fn records the context it
    gets, and an evaluation_fn that uses ctx.rollout_fn when the row asks for it."""
    module = types.ModuleType("evalmod")
    module.setups, module.contexts = [], []

    def factory(setup):
        module.setups.append(setup)

        async def rollout_fn(sample_prompt, *, evaluation=False, sample_index=None):
            module.contexts.append(dict(evaluation=evaluation, sample_index=sample_index))
            sample_prompt["mutated"] = True  # must not leak into the caller's row
            [c] = await setup.sampler.sample_with_prompt_tokens(sample_prompt["ids"], n=1, **setup.sample_kwargs)
            return RolloutSample(tokens=c.full_tokens, logprobs=[0.0] * c.prompt_len + c.inference_logprobs,
                                 loss_mask=[0] * c.prompt_len + [1], reward=float(c.text == sample_prompt["answer"]),
                                 finish_reason=c.finish_reason, text=c.text)

        return rollout_fn

    async def evaluate(ctx):
        if not ctx.extras.get("use_rollout_fn"):
            return {"version": ctx.version}
        rows = [{"ids": [1, 2], "answer": "7"}, {"ids": [3], "answer": "8"}]
        samples = [await ctx.rollout_fn(row, sample_index=i) for i, row in enumerate(rows)]
        assert all("mutated" not in row for row in rows)
        return {"accuracy": sum(s.reward for s in samples) / len(rows)}

    module.factory, module.evaluate = factory, evaluate
    monkeypatch.setitem(sys.modules, "evalmod", module)
    return module


def eval_config(**extras) -> Config:
    return legacy_config(run_id="r", rollout_fn_factory="evalmod:factory", evaluation_fn="evalmod:evaluate",
                         completions_per_prompt=4, extras=extras)


def test_ctx_rollout_fn_is_the_run_rollout_fn_with_evaluation_true(user_module):
    cfg, sampler = eval_config(use_rollout_fn=True), FakeSampler()
    fn = load_evaluation(cfg)
    ctx = EvaluationContext(sampler, None, 5, 5, {"max_tokens": 1}, dict(cfg.extras), config=cfg)  # as the trainer does
    assert run_evaluation(fn, ctx) == {"eval/accuracy": 0.5}
    [setup] = user_module.setups
    assert setup.sampler is sampler and setup.sample_kwargs == {"max_tokens": 1}
    assert setup.completions_per_prompt == 4 and setup.extras == {"use_rollout_fn": True}
    assert user_module.contexts == [dict(evaluation=True, sample_index=0), dict(evaluation=True, sample_index=1)]
    assert sampler.calls == [([1, 2], {"max_tokens": 1}), ([3], {"max_tokens": 1})]


def test_ctx_rollout_fn_is_built_lazily_and_once(user_module):
    cfg = eval_config()
    assert run_evaluation(load_evaluation(cfg), EvaluationContext(FakeSampler(), None, 2, 2, {})) == {"eval/version": 2}
    assert user_module.setups == []  # an evaluation_fn that does not use it pays nothing
    ctx = EvaluationContext(FakeSampler(), None, 2, 2, {}, config=cfg)
    assert ctx.rollout_fn is ctx.rollout_fn and len(user_module.setups) == 1
    with pytest.raises(RuntimeError, match="config"):
        EvaluationContext(FakeSampler(), None, 2, 2, {}).rollout_fn


async def no_context(sample_prompt):
    return {}


async def evaluation_only(sample_prompt, evaluation):
    return dict(evaluation=evaluation)


async def keyword_only(sample_prompt, *, row_index, evaluation=False):
    return dict(row_index=row_index, evaluation=evaluation)


async def any_context(sample_prompt, **context):
    return context


@pytest.mark.parametrize("rollout_fn, expected", [
    (no_context, {}),
    (evaluation_only, {"evaluation": True}),
    (keyword_only, {"row_index": 3, "evaluation": True}),
    (any_context, {"row_index": 3, "epoch": 0, "sample_index": 2, "evaluation": True}),
])
def test_ctx_rollout_fn_passes_only_the_declared_context(monkeypatch, rollout_fn, expected):
    module = types.ModuleType("ctxmod")
    module.factory = lambda setup: rollout_fn
    monkeypatch.setitem(sys.modules, "ctxmod", module)
    ctx = EvaluationContext(FakeSampler(), None, 0, 0, {},
                            config=legacy_config(run_id="r", rollout_fn_factory="ctxmod:factory"))
    assert asyncio.run(ctx.rollout_fn({"x": 1}, row_index=3, sample_index=2)) == expected
