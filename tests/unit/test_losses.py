"""Hand-computed checks for trainer.losses.

Inputs are built from ratios (``logprobs = old + log r``) so every expected number below
is plain arithmetic on r, A and w, worked out in the comments and written literally.
Gradients are w.r.t. logprobs: d(-r·A)/d lp = -r·A, divided by the token count N.
"""

from __future__ import annotations

import math

import pytest
import torch
from loss_inputs import F64, PPO, approx, make, run

from rlstream.trainer.losses import POLICY_LOSSES, compute_loss


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_grpo_values_grads_metrics(dtype) -> None:
    # max(-rA, -clip(r,0.8,1.2)A): seq0 -> -1.1, max(-1.5,-1.2)=-1.2 (clip), -0.5
    # seq1 -> max(1.4, 1.6)=1.6 (clip), max(2.6, 2.4)=2.6. Sum 1.4 over N=5 -> 0.28.
    loss, m, grad = run("grpo", make(**PPO, dtype=dtype))
    assert loss == approx(0.28)
    # Unclipped tokens: -rA/5 -> -0.22, -0.1, +0.52; clipped tokens and padding: 0.
    assert grad == [approx(g) for g in [[-0.22, 0.0, -0.1], [0.0, 0.52, 0.0]]]
    assert m["ppo_clip_frac"] == approx(0.4)                # 2 of 5
    assert m["ppo_ratio_mean"] == approx(1.02)              # (1.1+1.5+0.5+0.7+1.3)/5
    assert m["ppo_kl"] == approx(0.0973754)                 # mean of 1/r + ln r - 1
    assert m["ppo_log_ratio_mean"] == approx(-0.0573365)    # mean of ln r
    assert "mean_kl" not in m and m["ref_kl"] == 0.0        # no reference: no KL to it
    # inf = old here, so d = ln r: per sample (ln 1.1 + ln 1.5 + ln 0.5)/3, (ln 0.7 + ln 1.3)/2, then their mean
    assert m["inference_k1"] == approx(-0.0556396) and m["inference_samples"] == 2.0
    assert m["tis/weight_mean"] == approx(1.0) and m["tis/clip_frac"] == 0.0
    assert m["active_tokens"] == 5.0 and m["mean_loss"] == approx(0.28)
    assert all(isinstance(v, float) for v in m.values())


@pytest.mark.parametrize(("norm", "value", "grad"), [
    ("token_mean", 0.28, [[-0.22, 0.0, -0.1], [0.0, 0.52, 0.0], [0.0] * 3]),
    # seq means: -2.8/3 and 4.2/2 = 2.1, averaged over the 2 non-empty sequences.
    # grads: -rA/(3·2) -> -1.1/6, -0.5/6 ; 2.6/(2·2) = 0.65
    ("sequence_mean", 0.5833333, [[-0.1833333, 0.0, -0.0833333], [0.0, 0.65, 0.0], [0.0] * 3]),
    ("token_sum", 1.4, [[-1.1, 0.0, -0.5], [0.0, 2.6, 0.0], [0.0] * 3]),
])
def test_normalizations_ignore_empty_sequence(norm, value, grad) -> None:
    # A third, fully masked sequence must not count as a sequence nor as tokens.
    inputs = make(PPO["ratios"] + [[3.0, 3.0, 3.0]], PPO["adv"] + [5.0],
                  PPO["mask"] + [[0.0, 0.0, 0.0]])
    loss, _, g = run("grpo", inputs, normalization=norm)
    assert loss == approx(value)
    assert g == [approx(row) for row in grad]


def test_dapo_clip_higher() -> None:
    # Upper clip 1.28: seq0 r=1.5 -> -1.28 ; seq1 r=1.3, A<0 -> max(2.6, 2.56) = 2.6.
    # Sum -1.1-1.28-0.5+1.6+2.6 = 1.32 -> /5 = 0.264. Same clipped set as grpo.
    loss, m, grad = run("dapo", make(**PPO))
    assert loss == approx(0.264)
    assert grad == [approx(g) for g in [[-0.22, 0.0, -0.1], [0.0, 0.52, 0.0]]]
    assert m["ppo_clip_frac"] == approx(0.4)


DUAL = dict(ratios=[[4.0, 2.0], [4.0, 0.5]], adv=[-1.0, 1.0])


def test_dual_clip() -> None:
    # seq0 A=-1: max(4, 1.28)=4 -> min(4, c·1=3)=3 (dual) ; max(2, 1.28)=2 < 3 keeps 2.
    # seq1 A=+1: max(-4, -1.28) = -1.28 (clip) ; max(-0.5, -0.8) = -0.5.
    # (3 + 2 - 1.28 - 0.5)/4 = 0.805
    loss, m, grad = run("dapo", make(**DUAL), eps_clip_c=3.0)
    assert loss == approx(0.805)
    # Only unclipped tokens get -rA/4: 2/4 = 0.5 and -0.5/4 = -0.125.
    assert grad == [approx(g) for g in [[0.0, 0.5], [0.0, -0.125]]]
    assert m["ppo_clip_frac"] == approx(0.5)
    # Without dual clip: (4 + 2 - 1.28 - 0.5)/4 = 1.055
    assert run("dapo", make(**DUAL))[0] == approx(1.055)
    # grpo honours the dual clip too (upper clip 1.2): (3 + 2 - 1.2 - 0.5)/4 = 0.825
    assert run("grpo", make(**DUAL), eps_clip_c=3.0)[0] == approx(0.825)


# TIS batch: r = 1.1, 1.5, 0.5 ; train/inference ratio exp(old-inf) = 2, 0.5, 10 ; A = 1.
# A 4th masked token carries an extreme mismatch that must not enter the sequence mean.
TIS = dict(ratios=[[1.1, 1.5, 0.5, 1.0]], adv=[1.0], mask=[[1.0, 1.0, 1.0, 0.0]],
           w_raw=[[2.0, 0.5, 10.0, 1e-6]])


def test_tis_token_level() -> None:
    # w = min(ratio, 5) = 2, 0.5, 5 -> -rAw = -2.2, -0.75, -2.5 ; sum -5.45 / 3
    loss, m, grad = run("importance_sampling", make(**TIS))
    assert loss == approx(-1.8166667)
    assert grad == [approx([-0.7333333, -0.25, -0.8333333, 0.0])]
    assert m["tis/weight_mean"] == approx(2.5)          # (2 + 0.5 + 5)/3
    assert m["tis/clip_frac"] == approx(1 / 3)


def test_tis_sequence_level() -> None:
    # Geometric mean (2·0.5·10)^(1/3) = 10^(1/3) = 2.1544347 on every token.
    # loss = -(1.1 + 1.5 + 0.5)·2.1544347/3 = -2.2262492
    loss, m, _ = run("importance_sampling", make(**TIS), tis_level="sequence")
    assert loss == approx(-2.2262492)
    assert m["tis/weight_mean"] == approx(2.1544347) and m["tis/clip_frac"] == 0.0
    # Cap 2 binds for the whole sequence: -3.1·2/3 = -2.0666667
    loss, m, _ = run("importance_sampling", make(**TIS), tis_level="sequence", tis_cap=2.0)
    assert loss == approx(-2.0666667)
    assert m["tis/weight_mean"] == approx(2.0) and m["tis/clip_frac"] == approx(1.0)


def test_tis_weights_grpo() -> None:
    # r = 1.5 (clipped to 1.2), 1.1 ; w = 2, 0.5 ; A = 1 -> -2.4, -0.55 ; mean -1.475
    loss, _, grad = run("grpo", make([[1.5, 1.1]], [1.0], w_raw=[[2.0, 0.5]]))
    assert loss == approx(-1.475)
    assert grad == [approx([0.0, -0.275])]              # -1.1·0.5/2


def test_icepop() -> None:
    # θ = 3 keeps ratios in [1/3, 3]: 2 and 0.5 kept, 10 and 0.25 dropped (w = 0).
    # -rAw = -2.2, -0.75, 0, 0 -> -2.95/4 = -0.7375
    inputs = make([[1.1, 1.5, 0.5, 1.0]], [1.0], w_raw=[[2.0, 0.5, 10.0, 0.25]])
    loss, m, grad = run("importance_sampling", inputs, icepop_threshold=3.0)
    assert loss == approx(-0.7375)
    assert grad == [approx([-0.55, -0.1875, 0.0, 0.0])]
    assert m["tis/weight_mean"] == approx(0.625)        # (2 + 0.5)/4
    assert m["tis/clip_frac"] == 0.0                     # the 10 was dropped, not capped


def test_icepop_at_sequence_level_drops_by_token_ratio() -> None:
    # Pins the choice: IcePop keeps/drops by each token's own ratio, and kept tokens carry
    # the sequence weight. Ratios 2, 0.5, 10 with θ = 3: the 10 is dropped, although the
    # sequence weight 10^(1/3) = 2.1544347 (geometric mean over all three) is inside [1/3, 3].
    # -rAw = -1.1·2.1544347, -1.5·2.1544347, 0 -> /3 each: -0.7899594, -1.0772173, 0
    # loss = -(1.1 + 1.5)·2.1544347/3 = -1.8671767
    inputs = make([[1.1, 1.5, 0.5]], [1.0], w_raw=[[2.0, 0.5, 10.0]])
    loss, m, grad = run("importance_sampling", inputs, tis_level="sequence", icepop_threshold=3.0)
    assert loss == approx(-1.8671767)
    assert grad == [approx([-0.7899594, -1.0772173, 0.0])]
    assert m["tis/weight_mean"] == approx(1.4362898)    # 2·2.1544347/3
    assert m["tis/clip_frac"] == 0.0


def test_reinforce_uses_behaviour_ratio_only() -> None:
    # old is far away (r = 3) and old/inf mismatch is large, but reinforce only sees
    # exp(lp - inf) = 1.2, 0.8: -1.2·2, -0.8·2 -> mean -2.0 ; grad -exp(lp-inf)·A/2.
    lp = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    inf = lp.detach() - torch.log(torch.tensor([[1.2, 0.8]], dtype=F64))
    old = lp.detach() - math.log(3.0)
    loss, m = compute_loss("reinforce", lp, old, inf, torch.tensor([2.0], dtype=F64),
                           torch.ones(1, 2, dtype=F64))
    loss.backward()
    assert loss.item() == approx(-2.0)
    assert lp.grad.tolist() == [approx([-1.2, -0.8])]
    assert m["ppo_ratio_mean"] == approx(1.0)


def test_dro() -> None:
    # lp - old: seq0 = 0.5, 0 ; seq1 = 0, -0.5. A = 2, 0. w = 1, 2 on seq0.
    # seq0 tok0: -(-1·2·1 - 0.025·0.25) = 2.00625 ; tok1: -(-2·2·2) = 8
    # seq1 (A = 0): no policy term and the anchor is switched off -> 0, 0.
    # mean = 10.00625/4 = 2.5015625
    inputs = make([[math.exp(0.5), 1.0], [1.0, math.exp(-0.5)]], [2.0, 0.0],
                  lp=[[-1.0, -2.0], [-0.5, -1.5]], w_raw=[[1.0, 2.0], [1.0, 1.0]])
    loss, _, grad = run("dro", inputs)
    assert loss == approx(2.5015625)
    # d/dlp = -(A·w - β(lp-old)·[A≠0])/4: -(2 - 0.025)/4, -(4)/4 ; A=0 rows get exactly 0.
    assert grad == [approx([-0.49375, -1.0]), [0.0, 0.0]]


# GSPO batch: seq0 r = 1.1, 1.3 -> s = sqrt(1.43) = 1.1958261 (inside [0.8, 1.2]);
# seq1 r = 1.5 (second token masked) -> s = 1.5, clipped to 1.2. A = 1, 1.
GSPO = dict(ratios=[[1.1, 1.3], [1.5, 1.0]], adv=[1.0, 1.0], mask=[[1.0, 1.0], [1.0, 0.0]])


def test_gspo_values_and_sequence_gradient() -> None:
    # Every token carries -s·A: (-1.1958261·2 - 1.2)/3 = -1.1972174
    loss, m, grad = run("gspo", make(**GSPO))
    assert loss == approx(-1.1972174)
    # Gradient per token is -A·s/N = -0.3986087 (not -A·r_t/N); clipped seq1 gets 0.
    assert grad == [approx([-0.3986087, -0.3986087]), [0.0, 0.0]]
    assert m["ppo_clip_frac"] == approx(1 / 3)
    assert m["ppo_ratio_mean"] == approx(1.2972174)      # (2·1.1958261 + 1.5)/3
    # sequence_mean: (-1.1958261 - 1.2)/2 ; grad -A·s/(|y|·B) = -1.1958261/4, the true
    # sequence-level GSPO gradient d s/d lp_t = s/|y| spread over the sequence.
    loss, _, grad = run("gspo", make(**GSPO), normalization="sequence_mean")
    assert loss == approx(-1.1979130)
    assert grad == [approx([-0.2989565, -0.2989565]), [0.0, 0.0]]


def test_gspo_token_tis_weight_and_stop_gradient() -> None:
    # w differs within each sequence, so both the stop-gradient form and the *w count.
    # seq0 r = 1.1, 1.3 -> s = sqrt(1.43) = 1.1958261, A = +1, w = 2, 0.5
    # seq1 r = 0.9, 0.9 -> s = 0.9, A = -1, w = 1, 4 (max(0.9, 0.9): unclipped)
    # per token -s·A·w: -2.3916521, -0.5979130, 0.9, 3.6 -> sum 1.5104348 / N=4 = 0.3776087
    loss, m, grad = run("gspo", make([[1.1, 1.3], [0.9, 0.9]], [1.0, -1.0],
                                     w_raw=[[2.0, 0.5], [1.0, 4.0]]))
    assert loss == approx(0.3776087)
    # d/d lp_t = -s·A·w_t/N (exp(lp - sg(lp) + sg(log s)) has value s and derivative s):
    # -1.1958261·2/4, -1.1958261·0.5/4 ; 0.9·1/4, 0.9·4/4.
    assert grad == [approx([-0.5979130, -0.1494783]), approx([0.225, 0.9])]
    assert m["ppo_clip_frac"] == 0.0 and m["tis/weight_mean"] == approx(1.875)


def test_gspo_log_ratio_cap() -> None:
    # lp - old = 15 -> log s capped at 10 ; A = -1 -> loss = e^10 = 22026.465794806718.
    # The cap bounds the (detached) value only: the token still gets d/dlp = -A·s = e^10.
    loss, _, grad = run("gspo", make([[math.exp(15.0)]], [-1.0]))
    assert loss == approx(22026.465794806718)
    assert grad == [approx([22026.465794806718])]


def test_gspo_log_ratio_cap_is_one_sided() -> None:
    # lp - old = -15 is NOT raised to -10: s = e^-15 = 3.0590232e-07 (e^-10 would be 4.54e-05).
    # A = +1: max(-s, -0.8) = -s (unclipped) -> loss -s, grad -s.
    loss, m, grad = run("gspo", make([[math.exp(-15.0)]], [1.0]))
    assert loss == pytest.approx(-3.0590232e-07, rel=1e-6)
    assert m["ppo_ratio_mean"] == pytest.approx(3.0590232e-07, rel=1e-6)
    assert grad == [[pytest.approx(-3.0590232e-07, rel=1e-6)]]


def test_cispo_values() -> None:
    # lp = -1, -2, -0.5 ; clip(r, 0.8, 1.28) = 1.1, 1.28, 0.8 ; A = 1
    # -clip·lp·A = 1.1, 2.56, 0.4 -> 4.06/3 = 1.3533333 ; grad -clip·A/3 (even when clipped)
    loss, m, grad = run("cispo", make([[1.1, 1.5, 0.5]], [1.0], lp=[[-1.0, -2.0, -0.5]]))
    assert loss == approx(1.3533333)
    assert grad == [approx([-0.3666667, -0.4266667, -0.2666667])]
    assert m["ppo_clip_frac"] == approx(2 / 3)


def test_cispo_gradient_structure() -> None:
    # Gradient flows only through log pi: grad = -sg(clip(r))·A·w/N on active tokens.
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(3, 5, generator=g, dtype=F64) * 3
    old = lp + 0.6 * torch.randn(3, 5, generator=g, dtype=F64)
    inf = old + 0.4 * torch.randn(3, 5, generator=g, dtype=F64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
    mask = (torch.rand(3, 5, generator=g) > 0.3).to(F64)
    lp.requires_grad_()
    loss, _ = compute_loss("cispo", lp, old, inf, adv, mask)
    loss.backward()
    r = torch.exp(lp.detach() - old).clamp(0.8, 1.28)
    w = torch.exp(old - inf).clamp(max=5.0)
    expected = -r * adv[:, None] * w * mask / mask.sum()
    assert torch.allclose(lp.grad, expected, atol=1e-12)


# KL batch: lp - ref = 0.5, -1.0 ; A = 0 and r = 1 so only the penalty (β = 0.1) is left.
@pytest.mark.parametrize(("est", "mean_kl", "grad"), [
    ("k1", -0.25, [0.05, 0.05]),                        # d/dlp = 1 -> β/2
    ("k2", 0.3125, [0.025, -0.05]),                     # ½(0.25 + 1)/2 ; d/dlp = lp - ref
    # k3: x = ref-lp = -0.5, 1 -> e^-0.5 - 0.5 = 0.1065307, e - 2 = 0.7182818 ; mean 0.4124062
    # d/dlp = 1 - e^x = 0.3934693, -1.7182818 -> ·β/2
    ("k3", 0.4124062, [0.01967347, -0.08591409]),
])
def test_kl_estimators(est, mean_kl, grad) -> None:
    inputs = make([[1.0, 1.0]], [0.0], lp=[[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]], dtype=F64)
    loss, m, g = run("grpo", inputs, ref, kl_beta=0.1, kl_estimator=est)
    assert loss == approx(0.1 * mean_kl)
    assert g == [approx(grad)]
    assert m["ref_kl"] == approx(mean_kl)
    assert m["mean_kl"] == approx(-0.25)  # the cookbook's mean_kl: lp - ref per trained token, whatever the estimator
    # With kl_beta = 0 the metric is still reported but the loss ignores the reference.
    loss, m, _ = run("grpo", inputs, ref, kl_estimator=est)
    assert loss == 0.0 and m["ref_kl"] == approx(mean_kl)


def test_inference_drift_is_a_mean_over_samples_of_per_token_means() -> None:
    """The cookbook's train/inference_k1, k3: d = trainer logprob - behaviour logprob on the
    trained tokens. Sample 0: d = 0.2, -0.4 -> k1 -0.1; k3 (e^0.2 - 1.2 = 0.0214028,
    e^-0.4 - 0.6 = 0.0703200) 0.0458614. Sample 1: d = 1.0 -> k1 1.0, k3 e - 2 = 0.7182818.
    Means over the 2 samples (not the 3 tokens): k1 0.45, k3 0.3820716."""
    e = math.exp
    inputs = make([[e(0.2), e(-0.4)], [e(1.0), 1.0]], [1.0, -1.0], [[1.0, 1.0], [1.0, 0.0]])
    _, m, _ = run("grpo", inputs)
    assert m["inference_k1"] == approx(0.45) and m["inference_k3"] == approx(0.3820716)
    assert m["inference_samples"] == 2.0


@pytest.mark.parametrize("policy", POLICY_LOSSES)
def test_kl_added_to_every_loss(policy) -> None:
    # Same data with and without the k3 penalty: difference is β·0.4124062 = 0.04124062.
    inputs = make([[1.1, 0.9]], [1.0], lp=[[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]], dtype=F64)
    base = run(policy, inputs, ref)[0]
    assert run(policy, inputs, ref, kl_beta=0.1)[0] - base == approx(0.04124062)
