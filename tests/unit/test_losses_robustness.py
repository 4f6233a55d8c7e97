"""rlstream.trainer.losses at the edges: the ±20 clamps, masked garbage, empty masks, gradcheck in
float64 for every loss and normalisation, and input validation. Hand-computed values as in
test_losses.py."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from loss_inputs import F64, PPO, make, run

from rlstream.core.config import validate_config
from rlstream.core.errors import ConfigError
from rlstream.trainer.losses import POLICY_LOSSES, LossConfig, compute_loss

# ±20 clamps, in float32. exp(20) = 485165195.4097903 ; exp(30) = 1.07e13 would also be
# finite in float32, so the exact values below (not mere finiteness) pin each clamp.
E20 = 485165195.4097903
F32 = torch.float32


def raw(lp, old, inf, adv):
    """float32 (lp, old, inf, adv, mask) from literal logprobs, every token active."""
    lp_t = torch.tensor(lp, dtype=F32, requires_grad=True)
    old_t, inf_t = torch.tensor(old, dtype=F32), torch.tensor(inf, dtype=F32)
    return lp_t, old_t, inf_t, torch.tensor(adv, dtype=F32), torch.ones_like(old_t)


@pytest.mark.parametrize(("policy", "adv", "value", "grad"), [
    # lp - old = 30, 0 -> r = e^20 (clamped), 1 ; w = 1.
    # IS, A = +1: -(E20 + 1)/2 ; grad -rA/2 with the clamped token cut to 0.
    ("importance_sampling", 1.0, -242582598.2048951, [0.0, -0.5]),
    # grpo, A = -1: max(E20, 1.2) = E20 (unclipped), max(1, 1) = 1 -> (E20 + 1)/2.
    ("grpo", -1.0, 242582598.2048951, [0.0, 0.5]),
])
def test_log_ratio_clamp(policy, adv, value, grad) -> None:
    inputs = raw([[-1.0, -1.0]], [[-31.0, -1.0]], [[-31.0, -1.0]], [adv])
    loss, m, g = run(policy, inputs)
    assert math.isfinite(loss) and loss == pytest.approx(value, rel=1e-6)
    assert g == [[grad[0], pytest.approx(grad[1], rel=1e-6)]]
    assert m["ppo_ratio_mean"] == pytest.approx((E20 + 1) / 2, rel=1e-6)


def test_reinforce_clamp() -> None:
    # lp - inf = 30, 0 -> exp clamped to e^20 ; A = 1 -> -(E20 + 1)/2 ; grad 0, -0.5.
    loss, _, g = run("reinforce", raw([[-1.0, -1.0]], [[-1.0, -1.0]], [[-31.0, -1.0]], [1.0]))
    assert loss == pytest.approx(-242582598.2048951, rel=1e-6)
    assert g == [[0.0, pytest.approx(-0.5, rel=1e-6)]]


def test_tis_log_ratio_clamp() -> None:
    # old - inf = 30, 0 ; r = 1, A = 1. With a cap of 1e9 that does not bind at e^20:
    # w = E20, 1 (unclamped: min(e^30, 1e9) = 1e9) -> -(E20 + 1)/2 ; grad -w/2.
    inputs = raw([[-1.0, -1.0]], [[-1.0, -1.0]], [[-31.0, -1.0]], [1.0])
    loss, m, g = run("importance_sampling", inputs, tis_cap=1e9)
    assert loss == pytest.approx(-242582598.2048951, rel=1e-6)
    assert g == [[pytest.approx(-E20 / 2, rel=1e-6), pytest.approx(-0.5, rel=1e-6)]]
    assert m["tis/weight_mean"] == pytest.approx((E20 + 1) / 2, rel=1e-6)
    # Sequence level, default cap 5: old - inf = 30, -20 -> clamped mean (20 - 20)/2 = 0,
    # w = 1 on both tokens -> loss -1 (unclamped: mean 5, e^5 capped to 5 -> -5).
    inputs = raw([[-1.0, -21.0]], [[-1.0, -21.0]], [[-31.0, -1.0]], [1.0])
    loss, m, _ = run("importance_sampling", inputs, tis_level="sequence")
    assert loss == pytest.approx(-1.0, rel=1e-6) and m["tis/weight_mean"] == pytest.approx(1.0)


def test_k3_clamp() -> None:
    # ref - lp = 30, -0.5 ; A = 0, r = 1 so only 0.1·k3 is left.
    # k3 = e^20 - 20 - 1 = 485165174.4097903 (clamped) ; e^-0.5 + 0.5 - 1 = 0.1065307
    # loss = 0.1·(485165174.4097903 + 0.1065307)/2 = 24258258.7258160
    # grad: clamped token 0 ; 0.1·(1 - e^-0.5)/2 = 0.01967347
    lp, old, inf, adv, mask = raw([[-31.0, -1.0]], [[-31.0, -1.0]], [[-31.0, -1.0]], [0.0])
    ref = torch.tensor([[-1.0, -1.5]], dtype=F32)
    loss, m, g = run("grpo", (lp, old, inf, adv, mask), ref, kl_beta=0.1)
    assert math.isfinite(loss) and loss == pytest.approx(24258258.7258160, rel=1e-6)
    assert g == [[0.0, pytest.approx(0.01967347, rel=1e-5)]]
    assert m["ref_kl"] == pytest.approx(242582587.2581605, rel=1e-6)


def _random_batch(seed: int, fill: float | None):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(3, 4, generator=g, dtype=F64) * 2
    old = lp + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    inf = old + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    ref = lp + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    adv = torch.tensor([1.0, -0.7, float("nan") if fill is not None else 0.0], dtype=F64)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=F64)
    if fill is not None:
        lp, old, inf, ref = (torch.where(mask.bool(), t, fill) for t in (lp, old, inf, ref))
    return lp.requires_grad_(), old, inf, adv, mask, ref


@pytest.mark.parametrize("policy", POLICY_LOSSES)
@pytest.mark.parametrize("fill", [float("nan"), 1e30, float("-inf")])
def test_masked_garbage_changes_nothing(policy, fill) -> None:
    for level in ("token", "sequence"):
        for norm in ("token_mean", "sequence_mean", "token_sum"):
            cfg = LossConfig(kl_beta=0.1, tis_level=level, normalization=norm,
                             icepop_threshold=4.0, eps_clip_c=3.0)
            results = []
            for f in (None, fill):
                lp, old, inf, adv, mask, ref = _random_batch(1, f)
                loss, m = compute_loss(policy, lp, old, inf, adv, mask, ref, config=cfg)
                loss.backward()
                results.append((loss.detach(), lp.grad, m))
            (l0, g0, m0), (l1, g1, m1) = results
            assert torch.isfinite(l1) and torch.isfinite(g1).all()
            assert torch.equal(l0, l1) and torch.equal(g0, g1)
            assert m0 == m1


@pytest.mark.parametrize("policy", POLICY_LOSSES)
@pytest.mark.parametrize("norm", ["token_mean", "sequence_mean", "token_sum"])
def test_empty_mask_gives_zero_with_graph(policy, norm) -> None:
    lp, old, inf, adv, mask, ref = _random_batch(2, float("nan"))
    loss, m = compute_loss(policy, lp, old, inf, adv, torch.zeros_like(mask), ref,
                           config=LossConfig(kl_beta=0.1, normalization=norm))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros_like(lp))
    assert m["active_tokens"] == 0.0 and all(math.isfinite(v) for v in m.values())


# Ratios chosen away from every clip boundary (0.8, 1.2, 1.28) and GSPO sequence ratios
# (geometric means 0.98, 1.05) away from 0.8/1.2, so every loss is smooth there.
GC_RATIOS = [[1.05, 1.5, 0.6], [0.95, 1.15, 1.0]]
GC_CISPO = [[1.5, 0.6, 2.0], [0.5, 1.4, 1.0]]  # all clipped: sg(clip r) is constant


@pytest.mark.parametrize("policy", POLICY_LOSSES)
@pytest.mark.parametrize("norm", ["token_mean", "sequence_mean", "token_sum"])
def test_gradcheck(policy, norm) -> None:
    # CISPO's stop-gradient is invisible to finite differences, so check it where the
    # clipped weight is constant. GSPO's token gradient equals the true sequence gradient
    # only when w is uniform within a sequence, hence sequence-level TIS for it.
    ratios = GC_CISPO if policy == "cispo" else GC_RATIOS
    lp, old, inf, adv, mask = make(ratios, [1.0, -0.5], [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]],
                                   w_raw=[[1.2, 0.8, 3.0], [1.1, 0.7, 1.0]])
    ref = lp.detach() + torch.tensor([[0.3, -0.2, 0.1], [0.4, -0.5, 0.0]], dtype=F64)
    cfg = LossConfig(kl_beta=0.1, normalization=norm,
                     tis_level="sequence" if policy == "gspo" else "token")

    def fn(x):
        return compute_loss(policy, x, old, inf, adv, mask, ref, config=cfg)[0]

    assert torch.autograd.gradcheck(fn, (lp,), eps=1e-6, atol=1e-6)


def test_unknown_loss_and_kl_without_ref() -> None:
    inputs = make(**PPO)
    with pytest.raises(ValueError, match="cispo"):
        run("ppo", inputs)
    with pytest.raises(ValueError, match="ref_logprobs"):
        run("grpo", inputs, kl_beta=0.1)


def test_shape_validation() -> None:
    lp, old, inf, adv, mask = make(**PPO)
    with pytest.raises(ValueError, match="old_logprobs"):
        compute_loss("grpo", lp, old[:, :2], inf, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        compute_loss("grpo", lp, old, inf, adv[:, None], mask)
    with pytest.raises(ValueError, match="ref_logprobs"):
        compute_loss("grpo", lp, old, inf, adv, mask, ref_logprobs=old[:1])
    with pytest.raises(ValueError, match="2-D"):
        compute_loss("grpo", lp[0], old[0], inf[0], adv[:1], mask[0])


@pytest.mark.parametrize("bad", [
    dict(eps_clip=0.0), dict(eps_clip=float("nan")), dict(eps_clip_high=-0.1),
    dict(eps_clip_c=1.0), dict(tis={"cap": 0.0}), dict(tis={"level": "batch"}),
    dict(tis={"icepop_threshold": 0.5}), dict(dro_beta=-1.0), dict(gspo_clip=1.0),
    dict(cispo_eps_low=1.0), dict(cispo_eps_high=-0.1), dict(kl_beta=-0.1),
    dict(kl_estimator="k4"), dict(normalization="mean"),
])
def test_the_run_config_owns_the_loss_bounds(bad) -> None:
    """``LossConfig.of`` copies a validated ``Config`` without checking again: the bounds are
    the Config's, so each out-of-range loss setting is refused there, naming its field."""
    field = next(iter(bad))
    with pytest.raises(ConfigError, match=field):
        validate_config(bad)


def test_loss_config_of_copies_the_run_config() -> None:
    cfg = validate_config(dict(eps_clip=0.1, eps_clip_high=0.3, eps_clip_c=3.0, dro_beta=0.5, gspo_clip=0.3,
                               cispo_eps_low=0.1, cispo_eps_high=0.5, kl_beta=0.2, kl_estimator="k1",
                               normalization="token_sum", tis={"cap": 2.0, "level": "sequence",
                                                                "icepop_threshold": 4.0}))
    assert LossConfig.of(cfg) == LossConfig(
        eps_clip=0.1, eps_clip_high=0.3, eps_clip_c=3.0, tis_cap=2.0, tis_level="sequence", icepop_threshold=4.0,
        dro_beta=0.5, gspo_clip=0.3, cispo_eps_low=0.1, cispo_eps_high=0.5, kl_beta=0.2, kl_estimator="k1",
        normalization="token_sum")
    # one set of defaults, but for kl_beta: a run takes the cookbook's 0.001 (and loads a reference model), a bare
    # LossConfig has no reference logprobs to use
    assert LossConfig.of(validate_config({"kl_beta": 0.0})) == LossConfig()


def test_config_frozen_and_clip_defaults() -> None:
    cfg = LossConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.eps_clip = 0.3  # type: ignore[misc]
    assert cfg.clip_high("grpo") == 0.2 and cfg.clip_high("dapo") == 0.28
    assert LossConfig(eps_clip_high=0.3).clip_high("dapo") == 0.3
