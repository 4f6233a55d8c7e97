"""Non-finite steps (docs/design.md §15.33 Non-finite steps are skipped, never published): a
minibatch whose loss or gradient norm is NaN/inf is skipped (no optimizer step, gradients
dropped, ``train/nonfinite_skipped``), the weights stay finite and are published, a replay
makes the same decision, and no writer ever puts non-finite weights on disk."""
from __future__ import annotations

import logging

import pytest
import torch
from factories import legacy_config, sample
from safetensors.torch import load_file
from test_optimize import make_batch

from rlstream.builtin.tiny_model import build_model
from rlstream.core import bus, keys
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import GroupAdmitted, StepCommitted, group_id_for
from rlstream.trainer import optimize
from rlstream.trainer.optimize import policy_update
from rlstream.trainer.policy_model import all_finite, tensors_finite, weights_dir, write_model_dir
from rlstream.trainer.trainer import Trainer

RUN = "nf"
real_compute_loss = optimize.compute_loss


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def poisoned(loss: torch.Tensor, metrics: dict[str, float]) -> tuple[torch.Tensor, dict[str, float]]:
    """A NaN loss and the metrics compute_loss reads back with it (the step's skip is decided
    from ``mean_loss``, the loss's value in that one read). Its gradient stays finite (a NaN
    constant added), so only that decision can skip the step: the gradient norm would not."""
    return loss + float("nan"), metrics | {"mean_loss": float("nan")}


def nan_loss_on(calls: set[int]):
    """compute_loss, but NaN on the listed calls (0-based) of this policy_update."""
    seen = []

    def compute_loss(*args, **kwargs):
        loss, metrics = real_compute_loss(*args, **kwargs)
        seen.append(1)
        return poisoned(loss, metrics) if len(seen) - 1 in calls else (loss, metrics)

    return compute_loss


def nan_grad(*args, **kwargs):
    """A finite loss whose gradient is NaN: d/dx sqrt(x) at x = 0 is inf, times 0."""
    loss, metrics = real_compute_loss(*args, **kwargs)
    return loss + torch.sqrt(args[1].sum() * 0.0), metrics


def test_a_nan_minibatch_is_skipped_and_the_others_applied(monkeypatch):
    torch.manual_seed(0)
    model = build_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    batch, before = make_batch(model), params(model)
    monkeypatch.setattr(optimize, "compute_loss", nan_loss_on({1}))
    out = policy_update(model, opt, batch, cfg=legacy_config(prompt_groups_per_step=2, completions_per_prompt=8,
                                                             ppo_n_minibatches=2), lr=0.05)
    assert out["train/nonfinite_skipped"] == 1 and out["train/minibatches"] == 2
    assert torch.isfinite(torch.tensor(out["train/loss"])) and torch.isfinite(torch.tensor(out["train/grad_norm"]))
    assert all_finite(model) and not same(before, params(model))  # the first minibatch was applied
    assert all(torch.isfinite(s["exp_avg"]).all() for s in opt.state.values())  # AdamW's moments stay clean


@pytest.mark.parametrize("poison", [nan_loss_on({0}), nan_grad], ids=["loss", "grad"])
def test_a_batch_whose_only_minibatch_is_nan_leaves_the_weights_untouched(monkeypatch, poison):
    torch.manual_seed(0)
    model = build_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    batch, before = make_batch(model), params(model)
    monkeypatch.setattr(optimize, "compute_loss", poison)
    out = policy_update(model, opt, batch, cfg=legacy_config(prompt_groups_per_step=2, completions_per_prompt=8),
                        lr=0.05)
    assert out["train/nonfinite_skipped"] == 1
    assert same(before, params(model)) and opt.state == {}  # no step, no moment


def test_weights_made_non_finite_by_an_update_stop_the_trainer(monkeypatch):
    model = build_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    real_step = opt.step

    def step(*args, **kwargs):
        real_step(*args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).fill_(float("inf"))

    monkeypatch.setattr(opt, "step", step)
    with pytest.raises(RlstreamError, match=r"non-finite.*nothing was committed or published"):
        policy_update(model, opt, make_batch(model),
                      cfg=legacy_config(prompt_groups_per_step=2, completions_per_prompt=8), lr=0.05)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_any_non_finite_weight_and_no_finite_one(bad):
    """One float64 sum for all the weights: any NaN or infinity reaches it, and float32 weights
    at the top of their range do not overflow it (``tensors_finite``)."""
    model = build_model(0)
    assert all_finite(model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(torch.finfo(torch.float32).max)  # every weight finite, their float32 sum is not
    assert all_finite(model)
    with torch.no_grad():
        list(model.parameters())[-1].view(-1)[-1] = bad
    assert not all_finite(model)
    assert tensors_finite([]) and not tensors_finite([torch.tensor([1.0, float("inf")]), torch.tensor([-float("inf")])])


def test_no_writer_puts_non_finite_weights_on_disk(tmp_path):
    from rlstream.builtin.tiny_model import build_tokenizer

    model = build_model(0)
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(RlstreamError, match="not all finite"):
        write_model_dir(tmp_path / "v3", model, build_tokenizer(), version=3)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the trainer


def add_group(r, row: int, rewards: list[float]) -> None:
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0, submit_version=0,
                                                    group_size=len(rewards)))
    for m, reward in enumerate(rewards):
        bus.xadd(r, keys.rollouts(RUN), sample(row, m, reward=reward, group_size=len(rewards)))


def nan_on_large_advantages(*args, **kwargs):
    """NaN for a batch whose advantages exceed 2 (row 0's rewards 0, 5 under dr_grpo): the
    decision depends on the batch only, so a replay meets the same NaN."""
    loss, metrics = real_compute_loss(*args, **kwargs)
    return poisoned(loss, metrics) if args[4].abs().max() > 2 else (loss, metrics)


@pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py
def test_the_trainer_skips_publishes_finite_weights_and_replays_the_same_decision(r, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(optimize, "compute_loss", nan_on_large_advantages)
    add_group(r, 0, [0.0, 5.0])  # step 1: NaN
    add_group(r, 1, [0.0, 1.0])  # step 2: fine
    cfg = legacy_config(run_id=RUN, log_path=str(tmp_path), max_steps=2, prompt_groups_per_step=1,
                        completions_per_prompt=2, advantage="dr_grpo", dcp_save_interval=0,
                        save_final_checkpoint=False, lr_schedule="constant", learning_rate=1e-2)
    t = Trainer(cfg, r, cfg.run_dir())
    base = params(t.model)
    assert t.run() == 2
    steps = [m for _, m in bus.iter_all_events(r, RUN) if isinstance(m, StepCommitted)]
    assert [s.metrics["train/nonfinite_skipped"] for s in steps] == [1, 0]
    for version in (1, 2):
        published = load_file(str(weights_dir(cfg.run_dir(), version) / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in published.values()), f"v{version}"
    trained = params(t.model)
    assert all_finite(t.model) and not same(base, trained)

    # A fresh trainer (no checkpoint) replays both steps: same skip, same weights, no divergence warning.
    again = Trainer(cfg, r, cfg.run_dir())
    with caplog.at_level(logging.WARNING):
        again.resume()
    assert (again.step, again.version) == (2, 2)
    assert same(trained, params(again.model))
    assert "replay of step" not in caplog.text
