"""Token-level policy-gradient losses for the GRPO family.

Every loss is computed per token on (B, T) tensors, then reduced with the configured
normalisation: a sum over the batch (of tokens, or of per-sequence means) divided by a
denominator, the batch's own unless given. A micro-batch passes its whole (mini)batch's
denominator, so that the micro-batches' losses add up to the whole batch's loss, and their
gradients to its gradient (docs/design.md §15.39 Micro-batches sum to the whole-batch step).
Masked positions (mask == 0) are replaced with safe values through ``torch.where`` *before*
any arithmetic, so padding holding NaN/inf can never leak into the loss or its gradient
(0 * NaN is NaN, so multiplying by the mask is not enough).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rlstream.core.config import (
    KL_ESTIMATORS,
    NORMALIZATIONS,
    POLICY_LOSSES,
    Config,
    KlEstimator,
    Normalization,
    TisLevel,
)

# exp(±20) ~ 5e8: large enough never to bind on sane data, small enough to never overflow.
_LOG_RATIO_CLAMP = 20.0
# GSPO: upper cap on the log sequence ratio, keeps exp() finite for very off-policy
# sequences. One-sided: a very negative log ratio only underflows exp() to 0.
_GSPO_LOG_RATIO_CAP = 10.0
_DAPO_CLIP_HIGH = 0.28


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of :func:`compute_loss`, immutable. The trainer builds it from the run's
    validated ``Config`` (``LossConfig.of``), which owns the fields' ranges; tests of the pure
    functions below build one directly, defaults being ``Config``'s.

    ``eps_clip_high=None`` means the per-loss default: ``eps_clip`` (symmetric, 0.2) for
    grpo and 0.28 ("clip-higher") for dapo. ``eps_clip_c`` enables dual-clip PPO on
    negative-advantage tokens for grpo and dapo only (gspo's sequence clip and cispo's
    stop-gradient clip ignore it).

    ``icepop_threshold`` θ zeroes the TIS weight of every token whose *own* train/inference
    ratio exp(old - inf) leaves [1/θ, θ], at both ``tis_level`` values: IcePop targets
    individual mismatched tokens, and a sequence's geometric mean hides them (it stays in
    [1/θ, θ] whenever most tokens do). At ``"sequence"`` level the kept tokens carry the
    sequence weight, still the geometric mean over *all* active tokens, dropped ones
    included (the mean is not recomputed after dropping).
    """

    eps_clip: float = 0.2
    eps_clip_high: float | None = None
    eps_clip_c: float | None = None
    tis_cap: float = 5.0
    tis_level: TisLevel = "token"
    icepop_threshold: float | None = None
    dro_beta: float = 0.05
    gspo_clip: float = 0.2
    cispo_eps_low: float = 0.2
    cispo_eps_high: float = 0.28
    kl_beta: float = 0.0
    kl_estimator: KlEstimator = "k3"
    normalization: Normalization = "token_mean"

    @classmethod
    def of(cls, cfg: Config) -> LossConfig:
        """The loss fields of a validated ``Config``, copied as they are: ``Config`` checked
        their types and ranges, so nothing is checked again here."""
        return cls(eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high, eps_clip_c=cfg.eps_clip_c,
                   tis_cap=cfg.tis.cap, tis_level=cfg.tis.level, icepop_threshold=cfg.tis.icepop_threshold,
                   dro_beta=cfg.dro_beta, gspo_clip=cfg.gspo_clip, cispo_eps_low=cfg.cispo_eps_low,
                   cispo_eps_high=cfg.cispo_eps_high, kl_beta=cfg.kl_beta, kl_estimator=cfg.kl_estimator,
                   normalization=cfg.normalization)

    def clip_high(self, policy_loss: str) -> float:
        """Upper PPO clip epsilon after resolving the per-loss default."""
        if self.eps_clip_high is not None:
            return self.eps_clip_high
        return _DAPO_CLIP_HIGH if policy_loss == "dapo" else self.eps_clip


def masked_mean(x_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """Mean of ``x`` over positions where the bool mask is set; 0 (not NaN) when empty."""
    total = torch.where(mask_B_T, x_B_T, torch.zeros_like(x_B_T)).sum()
    return total / mask_B_T.sum().clamp(min=1).to(x_B_T.dtype)


def sequence_mean(x_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """Per-sequence mean over active tokens, shape (B,); 0 for sequences with none."""
    total_B = torch.where(mask_B_T, x_B_T, torch.zeros_like(x_B_T)).sum(-1)
    return total_B / mask_B_T.sum(-1).clamp(min=1).to(x_B_T.dtype)


def tis_weights(
    old_B_T: Tensor, inf_B_T: Tensor, mask_B_T: Tensor, config: LossConfig
) -> tuple[Tensor, Tensor]:
    """Truncated importance weights correcting the trainer/inference-engine mismatch.

    Returns ``(w_B_T, capped_B_T)``: detached weights (1 on masked positions) and a bool
    map of active tokens where the cap was binding. Inputs must already be sanitised.
    IcePop decides per token from the token's own ratio, whatever ``tis_level`` (see
    :class:`LossConfig`).
    """
    log_w_B_T = (old_B_T - inf_B_T).detach().clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if config.tis_level == "sequence":
        # Geometric mean of the token ratios: one weight per sequence, length-independent.
        level_B_T = sequence_mean(log_w_B_T, mask_B_T)[:, None].expand_as(log_w_B_T)
    else:
        level_B_T = log_w_B_T
    raw_B_T = torch.exp(level_B_T)
    capped_B_T = (raw_B_T > config.tis_cap) & mask_B_T
    w_B_T = raw_B_T.clamp(max=config.tis_cap)
    if config.icepop_threshold is not None:
        # IcePop: drop tokens whose own mismatch is extreme rather than down-weighting.
        keep_B_T = log_w_B_T.abs() <= math.log(config.icepop_threshold)
        w_B_T = torch.where(keep_B_T, w_B_T, torch.zeros_like(w_B_T))
        capped_B_T = capped_B_T & keep_B_T
    return torch.where(mask_B_T, w_B_T, torch.ones_like(w_B_T)), capped_B_T


def kl_penalty(logprobs_B_T: Tensor, ref_logprobs_B_T: Tensor, estimator: str) -> Tensor:
    """Per-token differentiable KL(pi || ref) estimate (Schulman's k1 / k2 / k3)."""
    log_ratio_B_T = logprobs_B_T - ref_logprobs_B_T
    if estimator == "k1":
        return log_ratio_B_T
    if estimator == "k2":
        return 0.5 * log_ratio_B_T.square()
    if estimator == "k3":
        # Clamp only protects exp() from overflow; k3 is >= 0 and unbiased otherwise.
        x_B_T = (-log_ratio_B_T).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return torch.exp(x_B_T) - x_B_T - 1.0
    raise ValueError(f"unknown kl_estimator {estimator!r}; allowed: {KL_ESTIMATORS}")


def clipped_surrogate(
    ratio_B_T: Tensor, adv_B_T: Tensor, eps_low: float, eps_high: float,
    dual_clip_c: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO pessimistic surrogate ``max(-r·A, -clip(r)·A)`` with optional dual clip.

    Returns ``(loss_B_T, clip_active_B_T)``; clip is active where a clipped branch was
    selected and differs from the unclipped one (so its gradient is zero there).
    """
    unclipped_B_T = -ratio_B_T * adv_B_T
    clipped_B_T = -ratio_B_T.clamp(1.0 - eps_low, 1.0 + eps_high) * adv_B_T
    # torch.where instead of torch.maximum: no half/half gradient split at ties.
    clip_active_B_T = clipped_B_T > unclipped_B_T
    loss_B_T = torch.where(clip_active_B_T, clipped_B_T, unclipped_B_T)
    if dual_clip_c is not None:
        # Dual clip bounds the loss of A<0 tokens whose ratio exploded: loss <= -c·A.
        bound_B_T = -dual_clip_c * adv_B_T
        dual_B_T = (adv_B_T < 0) & (bound_B_T < loss_B_T)
        loss_B_T = torch.where(dual_B_T, bound_B_T, loss_B_T)
        clip_active_B_T = clip_active_B_T | dual_B_T
    return loss_B_T, clip_active_B_T


def loss_denominator(mask_B_T: Tensor, normalization: str) -> float:
    """What ``normalization`` divides the batch's loss sum by: its active tokens
    (``token_mean``), its sequences with at least one (``sequence_mean``), 1 (``token_sum``);
    at least 1, so an empty batch gives 0, not NaN."""
    mask_B_T = mask_B_T != 0
    tokens, sequences = torch.stack([mask_B_T.sum(), mask_B_T.any(-1).sum()]).tolist()  # one read of the device
    return denominator_of(tokens, sequences, normalization)


def denominator_of(tokens: int, sequences: int, normalization: str) -> float:
    """:func:`loss_denominator` from a batch's counts of active tokens and of sequences with
    at least one (a streamed step adds them up as its groups arrive)."""
    if normalization == "token_mean":
        return float(max(tokens, 1))
    if normalization == "sequence_mean":
        return float(max(sequences, 1))
    if normalization == "token_sum":
        return 1.0
    raise ValueError(f"unknown normalization {normalization!r}; allowed: {NORMALIZATIONS}")


def reduce_loss(loss_B_T: Tensor, mask_B_T: Tensor, normalization: str, denominator: float | None = None) -> Tensor:
    """Reduce per-token losses to a scalar: the batch's sum (of active tokens' losses, or of
    per-sequence means for ``sequence_mean``) over ``denominator``, by default this batch's
    own (:func:`loss_denominator`). Empty masks give 0 with the graph intact."""
    if normalization == "sequence_mean":
        total = sequence_mean(loss_B_T, mask_B_T).sum()
    elif normalization in NORMALIZATIONS:
        total = torch.where(mask_B_T, loss_B_T, torch.zeros_like(loss_B_T)).sum()
    else:
        raise ValueError(f"unknown normalization {normalization!r}; allowed: {NORMALIZATIONS}")
    return total / (loss_denominator(mask_B_T, normalization) if denominator is None else denominator)


def _validate(policy_loss: str, tensors: dict[str, Tensor | None], adv: Tensor) -> None:
    if policy_loss not in POLICY_LOSSES:
        raise ValueError(f"unknown policy_loss {policy_loss!r}; allowed: {POLICY_LOSSES}")
    shape = tensors["logprobs"].shape  # type: ignore[union-attr]
    if len(shape) != 2:
        raise ValueError(f"logprobs must be 2-D (B, T), got shape {tuple(shape)}")
    for name, t in tensors.items():
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logprobs shape {tuple(shape)}")
    if adv.shape != shape[:1] and adv.shape != shape:
        raise ValueError(f"advantages must have shape ({shape[0]},) or {tuple(shape)} (one per token), "
                         f"got {tuple(adv.shape)}")


def compute_loss(
    policy_loss: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    inf_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    config: LossConfig = LossConfig(),
    denominator: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Scalar policy loss (differentiable w.r.t. ``logprobs``) and float metrics.

    Args (all (B, T) except ``advantages``: (B,), or (B, T) for one per token): ``logprobs``
    of the current policy, ``old_logprobs`` of the policy that defined the PPO trust region, ``inf_logprobs``
    of the sampler (behaviour policy), ``mask`` (non-zero = trained token), optional
    frozen ``ref_logprobs`` for the KL penalty. All but ``logprobs`` are detached.
    ``denominator``: the normalisation's divisor (see :func:`reduce_loss`), given when this
    batch is a micro-batch of a larger one; the metrics are this batch's own means.

    Clamps (all at ±20, so exp() stays finite in float32): ``lp - old`` before the ratio,
    ``old - inf`` before the TIS weight, ``lp - inf`` (reinforce) and ``ref - lp`` (k3).
    A clamp that binds also cuts the gradient of that token (clamp's derivative is 0
    outside the bound). The dual clip (``eps_clip_c``) applies to grpo and dapo.
    GSPO: ``log s`` (mean of ``lp - old`` over the sequence's active tokens) is capped at
    +10 on the upper side only: a very negative ``log s`` only underflows exp() to 0,
    harmlessly, so it is left as is. The cap acts on the detached value, so a capped token
    keeps its gradient s. The ratio is then clipped to [1-gspo_clip, 1+gspo_clip].
    The weight ``w`` multiplies every loss but reinforce, GSPO included (per token).
    """
    _validate(policy_loss, {"logprobs": logprobs, "old_logprobs": old_logprobs,
                            "inf_logprobs": inf_logprobs, "mask": mask,
                            "ref_logprobs": ref_logprobs}, advantages)
    if config.kl_beta > 0 and ref_logprobs is None:
        raise ValueError("kl_beta > 0 requires ref_logprobs")

    # Sanitise: every masked position becomes 0 before any arithmetic (NaN/inf safe).
    mask_B_T = mask != 0
    zeros_B_T = torch.zeros_like(logprobs)

    def clean(t: Tensor) -> Tensor:
        return torch.where(mask_B_T, t.detach().to(logprobs.dtype), zeros_B_T)

    lp_B_T = torch.where(mask_B_T, logprobs, zeros_B_T)
    old_B_T, inf_B_T = clean(old_logprobs), clean(inf_logprobs)
    # one advantage per sequence (the common case), or one per token (IGPO's turns)
    adv_B_T = clean(advantages[:, None].expand_as(logprobs) if advantages.dim() == 1 else advantages)
    ref_B_T = clean(ref_logprobs) if ref_logprobs is not None else None

    log_r_B_T = (lp_B_T - old_B_T).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    r_B_T = torch.exp(log_r_B_T)
    w_B_T, tis_capped_B_T = tis_weights(old_B_T, inf_B_T, mask_B_T, config)
    ratio_B_T = r_B_T  # the ratio reported in metrics
    clip_B_T = torch.zeros_like(mask_B_T)

    if policy_loss in ("grpo", "dapo"):
        surr_B_T, clip_B_T = clipped_surrogate(
            r_B_T, adv_B_T, config.eps_clip, config.clip_high(policy_loss), config.eps_clip_c)
        loss_B_T = surr_B_T * w_B_T
    elif policy_loss == "importance_sampling":
        loss_B_T = -r_B_T * adv_B_T * w_B_T
    elif policy_loss == "reinforce":
        # Ratio against the sampler itself: the TIS weight would double-correct.
        ratio_B_T = torch.exp((lp_B_T - inf_B_T).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
        loss_B_T = -ratio_B_T * adv_B_T
    elif policy_loss == "dro":
        # The quadratic anchor only applies where there is a learning signal (A != 0).
        anchor_B_T = 0.5 * config.dro_beta * (lp_B_T - old_B_T).square()
        anchor_B_T = torch.where(adv_B_T != 0, anchor_B_T, zeros_B_T)
        loss_B_T = -(lp_B_T * adv_B_T * w_B_T - anchor_B_T)
    elif policy_loss == "gspo":
        log_s_B = sequence_mean(lp_B_T - old_B_T, mask_B_T).clamp(max=_GSPO_LOG_RATIO_CAP)
        # Value = sequence ratio s on every token, gradient d s_t / d lp_t = s (GSPO-token).
        ratio_B_T = torch.exp(lp_B_T - lp_B_T.detach() + log_s_B.detach()[:, None])
        surr_B_T, clip_B_T = clipped_surrogate(
            ratio_B_T, adv_B_T, config.gspo_clip, config.gspo_clip)
        loss_B_T = surr_B_T * w_B_T
    else:  # cispo
        low, high = 1.0 - config.cispo_eps_low, 1.0 + config.cispo_eps_high
        # Clipped ratio is a stop-gradient weight, so clipped tokens still get gradient.
        clipped_r_B_T = r_B_T.detach().clamp(low, high)
        clip_B_T = (r_B_T < low) | (r_B_T > high)
        loss_B_T = -clipped_r_B_T * lp_B_T * adv_B_T * w_B_T

    kl_B_T = None
    if ref_B_T is not None:
        kl_B_T = kl_penalty(lp_B_T, ref_B_T, config.kl_estimator)
        if config.kl_beta > 0:
            loss_B_T = loss_B_T + config.kl_beta * kl_B_T

    loss = reduce_loss(loss_B_T, mask_B_T, config.normalization, denominator)

    with torch.no_grad():
        # Every metric read back in one transfer: a float() each is a device sync each on CUDA (~12 a
        # micro-batch) and ~20 µs each on CPU. Summed in at least float32: a bfloat16 count is not exact past 256.
        dtype = torch.promote_types(logprobs.dtype, torch.float32)
        means = {"ppo_clip_frac": clip_B_T & mask_B_T, "ppo_ratio_mean": ratio_B_T,
                 "ppo_kl": torch.exp(-log_r_B_T) + log_r_B_T - 1.0, "ppo_log_ratio_mean": log_r_B_T,
                 "ref_kl": kl_B_T if kl_B_T is not None else zeros_B_T,
                 "tis/weight_mean": w_B_T, "tis/clip_frac": tis_capped_B_T}
        if ref_B_T is not None:  # the cookbook's: the policy's KL to the reference, k1 per trained token
            means["mean_kl"] = lp_B_T.detach() - ref_B_T
        x_M_B_T = torch.stack([x.detach().to(dtype) for x in means.values()])
        tokens = mask_B_T.sum().to(dtype)
        means_M = torch.where(mask_B_T, x_M_B_T, torch.zeros_like(x_M_B_T)).sum((1, 2)) / tokens.clamp(min=1)
        *values, active, mean_loss, k1, k3, n = torch.cat([
            means_M, torch.stack([tokens, loss.detach().to(dtype)]),
            inference_drift(lp_B_T.detach(), inf_B_T, mask_B_T).to(dtype)]).tolist()
        metrics = dict(zip(means, values)) | {"active_tokens": active, "mean_loss": mean_loss,
                                              **drift_metrics(k1, k3, n)}
        if "mean_kl" in metrics:
            metrics["mean_kl"] = metrics.pop("mean_kl")  # last, where it always was
    return loss, metrics


def inference_drift(logprobs_B_T: Tensor, inf_logprobs_B_T: Tensor, mask_B_T: Tensor) -> Tensor:
    """How far the trainer's logprobs are from the sampler's on the same tokens (the cookbook's
    ``train/inference_k1`` / ``inference_k3``), as (3,) sums on the device that ``drift_metrics``
    turns into the metrics: per sample, the mean over its trained tokens of d = logprob -
    behaviour logprob (k1) and of exp(d) - d - 1 (k3, >= 0), each summed over the samples that
    have a trained token, and how many those are (``inference_samples``). Detached inputs,
    masked positions already 0."""
    tokens_B = mask_B_T.sum(-1)
    has_B = tokens_B > 0
    dtype = torch.promote_types(logprobs_B_T.dtype, torch.float32)  # a bfloat16 caller's count stays exact
    logprobs_B_T, inf_logprobs_B_T = logprobs_B_T.to(dtype), inf_logprobs_B_T.to(dtype)
    d_B_T = torch.where(mask_B_T, logprobs_B_T - inf_logprobs_B_T, torch.zeros_like(logprobs_B_T))
    k3_B_T = torch.where(mask_B_T, torch.exp(d_B_T.clamp(max=_LOG_RATIO_CLAMP)) - d_B_T - 1.0, torch.zeros_like(d_B_T))
    per_B = tokens_B.clamp(min=1).to(d_B_T.dtype)
    # A row without a trained token adds exactly 0 to each sum (zeroed values, divisor 1): no boolean
    # indexing, which would read the device back (its nonzero) on CUDA.
    return torch.stack([(d_B_T.sum(-1) / per_B).sum(), (k3_B_T.sum(-1) / per_B).sum(), has_B.sum().to(d_B_T.dtype)])


def drift_metrics(k1: float, k3: float, n: float) -> dict[str, float]:
    """``inference_drift``'s sums as the metrics: the means over the samples with a trained token."""
    return {"inference_k1": k1 / max(n, 1.0), "inference_k3": k3 / max(n, 1.0), "inference_samples": n}
