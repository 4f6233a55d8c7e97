"""evaluation_fn results, and W&B logging through a stand-in module (wandb is optional)."""
from __future__ import annotations

import sys
import types

import pytest

from rlstream.config import Config
from rlstream.errors import ConfigError
from trainer.hooks import EvaluationContext, run_evaluation
from trainer.wandb_log import make_logger


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
    assert make_logger(Config(run_id="r")) is None
    with pytest.raises(ConfigError, match="pip install wandb"):
        make_logger(Config(run_id="r", wandb={"project": "p"}))


def test_wandb_logs_each_step(monkeypatch):
    logged, calls = [], {}

    class Run:
        def log(self, metrics, step):
            logged.append((step, metrics))

        def finish(self):
            calls["finished"] = True

    fake = types.SimpleNamespace(init=lambda **kw: calls.update(init=kw) or Run())
    monkeypatch.setitem(sys.modules, "wandb", fake)
    logger = make_logger(Config(run_id="r1", wandb={"project": "p"}))
    logger.log({"step": 2, "train/loss": 0.5})
    logger.finish()
    assert calls["init"]["project"] == "p" and calls["init"]["name"] == "r1" and calls["init"]["mode"] == "offline"
    assert logged == [(2, {"train/loss": 0.5})] and calls["finished"]
