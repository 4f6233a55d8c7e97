"""One rollout batch -> ``min(ppo_n_minibatches, B)`` optimizer steps (the PPO inner loop).

Old-policy logprobs are fixed once per rollout batch, before any update, so that from
the second minibatch on the ratio moves away from 1 and the clip acts:
- ``anchor_logp = "old_policy"``: the current weights' logprobs. With a single minibatch
  they equal the live forward's, detached (the forward runs without dropout, see
  ``token_logprobs``), so that forward is reused (one forward less);
- ``anchor_logp = "rollout"``: the behaviour logprobs from the worker (then the TIS weight
  exp(old - inf) is 1 by construction).

A minibatch whose loss or gradient norm is not finite is skipped: its gradients are dropped
and the optimizer does not step (``train/nonfinite_skipped`` counts them). The decision is a
function of the batch and the weights, so a replay makes it again. Weights that are not all
finite after the update stop the trainer before anything is committed or published
(docs/design.md §15.33 Non-finite steps are skipped, never published).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from rlstream.core.config import Config
from rlstream.core.errors import RlstreamError
from rlstream.trainer.batch import Batch
from rlstream.trainer.losses import LossConfig, compute_loss
from rlstream.trainer.policy_model import all_finite, token_logprobs


def loss_config(cfg: Config) -> LossConfig:
    return LossConfig(
        eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high, eps_clip_c=cfg.eps_clip_c,
        tis_cap=cfg.tis.cap, tis_level=cfg.tis.level, icepop_threshold=cfg.tis.icepop_threshold,
        dro_beta=cfg.dro_beta, kl_beta=cfg.kl_beta, kl_estimator=cfg.kl_estimator,
        normalization=cfg.normalization,
    )


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with the cookbook's hyper-parameters: betas (0.9, 0.95) (a shorter second-moment
    memory than 0.999, steadier under the non-stationary RL gradient), weight decay 0.01 on
    every parameter, eps 1e-8. The LR is overwritten each step by :func:`policy_update`."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                             weight_decay=0.01, eps=1e-8)


def minibatch_indices(B: int, K: int) -> list[torch.Tensor]:
    """Split ``B`` samples into ``min(K, B)`` contiguous, non-empty index slices.

    A batch can hold fewer than K samples (the final partial batch when the data runs out,
    a small incomplete group, a replayed step), and an empty slice would crash the forward.
    """
    return list(torch.arange(B).tensor_split(min(K, B)))


def policy_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, *, cfg: Config,
                  lr: float, ref_model: torch.nn.Module | None = None) -> dict[str, float]:
    """Run k = min(K, B) optimizer steps on one rollout batch; return ``train/`` metrics
    averaged over the k steps (``train/minibatches`` = k)."""
    temperature, config = cfg.temperature, loss_config(cfg)
    slices = minibatch_indices(batch.tokens_B_N.shape[0], cfg.ppo_n_minibatches)
    k = len(slices)
    forward_args = (batch.tokens_B_N, batch.attention_B_N, temperature)
    old_B_T = None
    if cfg.anchor_logp == "rollout":
        old_B_T = batch.inf_logprobs_B_T
    elif k > 1:
        with torch.no_grad():
            old_B_T = token_logprobs(model, *forward_args)
    ref_B_T = None
    if ref_model is not None:
        with torch.no_grad():
            ref_B_T = token_logprobs(ref_model, *forward_args)
    for group in optimizer.param_groups:
        group["lr"] = lr

    sums: dict[str, float] = defaultdict(float)  # metrics of the applied minibatches
    skipped: dict[str, float] = defaultdict(float)  # ... and of the skipped ones
    for idx in slices:
        logprobs_B_T = token_logprobs(model, batch.tokens_B_N[idx], batch.attention_B_N[idx], temperature)
        loss, metrics = compute_loss(
            cfg.policy_loss, logprobs_B_T, logprobs_B_T.detach() if old_B_T is None else old_B_T[idx],
            batch.inf_logprobs_B_T[idx], batch.advantages_B[idx], batch.mask_B_T[idx],
            ref_logprobs=None if ref_B_T is None else ref_B_T[idx], config=config)
        grad_norm, applied = backward_and_step(model, optimizer, loss, cfg.grad_clip_norm)
        metrics.update(loss=float(loss.detach()), grad_norm=grad_norm, minibatches=1.0)
        for key, value in metrics.items():
            (sums if applied else skipped)[key] += value
    n_applied = int(sums["minibatches"])
    if n_applied and not all_finite(model):
        raise RlstreamError(f"the update made weights non-finite at lr {lr:g} although every applied loss and "
                            "gradient norm was finite; nothing was committed or published. Lower learning_rate "
                            "or set grad_clip_norm, then restart the trainer")
    # The step's metrics average the applied minibatches; when none was, the skipped ones (non-finite) show why.
    reported = sums if n_applied else skipped
    out = {f"train/{key}": value / reported["minibatches"] for key, value in reported.items()}
    out["train/active_tokens"] = reported["active_tokens"]  # a count: summed, not averaged
    out["train/lr"] = lr
    out["train/minibatches"] = k
    out["train/nonfinite_skipped"] = k - n_applied
    return out


def backward_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                      clip: float | None) -> tuple[float, bool]:
    """Backward, clip and step: (the gradient norm before clipping, whether the step was
    applied). A non-finite loss or gradient norm applies nothing: stepping would write NaN
    into the weights and into AdamW's moments, from which no later step recovers."""
    optimizer.zero_grad(set_to_none=True)
    if not torch.isfinite(loss):
        return float("nan"), False
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
    if not torch.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm), False
    optimizer.step()
    return float(grad_norm), True
