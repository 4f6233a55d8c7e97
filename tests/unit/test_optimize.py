"""The PPO inner loop and the reference model, on the tiny model (no Redis)."""
from __future__ import annotations

import pytest
import torch

from rlstream.config import Config
from rlstream.tiny_model import build_model
from trainer.advantages import resolve_advantage
from trainer.batch import Batch
from trainer.optimize import policy_update
from trainer.policy_model import token_logprobs


def make_batch(model, B: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(3, 13, (B,), generator=g), torch.randint(3, 13, (B,), generator=g)
    answer = torch.randint(3, 13, (B,), generator=g)
    tokens = torch.stack([a, torch.full((B,), 13), b, torch.full((B,), 14), answer], dim=1)
    attention = torch.ones_like(tokens)
    with torch.no_grad():
        inf = token_logprobs(model, tokens, attention, 1.0)
    mask = torch.zeros_like(inf)
    mask[:, -1] = 1.0  # only the answer token is trained
    advantages = torch.tensor([1.0, -1.0] * (B // 2))
    return Batch(tokens, attention, inf, mask, advantages)


def cfg(**overrides) -> Config:
    return Config(prompt_groups_per_step=2, completions_per_prompt=8, **overrides)


def test_minibatches_make_the_clip_act():
    torch.manual_seed(0)
    model = build_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    single = policy_update(model, opt, make_batch(model), cfg=cfg(), lr=0.05)
    assert single["train/ppo_clip_frac"] == 0.0 and single["train/ppo_ratio_mean"] == pytest.approx(1.0)
    multi = policy_update(model, opt, make_batch(model, seed=1), cfg=cfg(ppo_n_minibatches=4), lr=0.05)
    assert multi["train/minibatches"] == 4
    assert multi["train/ppo_clip_frac"] > 0.0


def test_reference_kl_starts_at_zero_and_rises():
    import copy

    torch.manual_seed(0)
    model = build_model(0)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    c = cfg(kl_beta=0.1)
    kls = [policy_update(model, opt, make_batch(model, seed=i), cfg=c, lr=0.01, ref_model=ref)["train/ref_kl"]
           for i in range(5)]
    assert kls[0] == pytest.approx(0.0, abs=1e-7)
    assert kls[-1] > 1e-4 and kls[-1] > kls[1]


def test_rollout_anchor_has_unit_tis_weight():
    torch.manual_seed(0)
    model = build_model(0)
    batch = make_batch(model)
    batch.inf_logprobs_B_T[:, -1] -= 0.5  # a stale sampler: old - inf = 0.5 under old_policy
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stale = policy_update(model, opt, batch, cfg=cfg(), lr=1e-3)
    assert stale["train/tis/weight_mean"] == pytest.approx(torch.exp(torch.tensor(0.5)).item(), rel=1e-3)
    rollout = policy_update(model, opt, batch, cfg=cfg(anchor_logp="rollout"), lr=1e-3)
    assert rollout["train/tis/weight_mean"] == pytest.approx(1.0)


def test_update_changes_weights_towards_positive_advantage():
    torch.manual_seed(0)
    model = build_model(0)
    batch = make_batch(model)
    before = token_logprobs(model, batch.tokens_B_N, batch.attention_B_N, 1.0)[:, -1].detach()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy_update(model, opt, batch, cfg=cfg(), lr=1e-2)
    after = token_logprobs(model, batch.tokens_B_N, batch.attention_B_N, 1.0)[:, -1].detach()
    delta = after - before
    assert delta[batch.advantages_B > 0].mean() > delta[batch.advantages_B < 0].mean()


def test_resolve_advantage_builtin_and_user_function():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(resolve_advantage("dr_grpo")(rewards), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    user = resolve_advantage("torch:neg")
    assert torch.equal(user(rewards), -rewards)
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_advantage("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="must look like"):
        resolve_advantage("not a spec")
