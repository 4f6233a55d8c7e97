"""One rollout batch -> ``ppo_n_minibatches`` optimizer steps (the PPO inner loop).

Old-policy logprobs are fixed once per rollout batch, before any update, so that from
the second minibatch on the ratio moves away from 1 and the clip acts:
- ``anchor_logp = "old_policy"``: the current weights' logprobs. With a single minibatch
  they equal the live forward's, detached, so that forward is reused (one forward less);
- ``anchor_logp = "rollout"``: the behaviour logprobs from the worker (then the TIS weight
  exp(old - inf) is 1 by construction).
"""
from __future__ import annotations

from collections import defaultdict

import torch

from rlstream.config import Config
from trainer.batch import Batch
from trainer.losses import LossConfig, compute_loss
from trainer.policy_model import token_logprobs


def loss_config(cfg: Config) -> LossConfig:
    return LossConfig(
        eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high, eps_clip_c=cfg.eps_clip_c,
        tis_cap=cfg.tis.cap, tis_level=cfg.tis.level, icepop_threshold=cfg.tis.icepop_threshold,
        dro_beta=cfg.dro_beta, kl_beta=cfg.kl_beta, kl_estimator=cfg.kl_estimator,
        normalization=cfg.normalization,
    )


def policy_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, *, cfg: Config,
                  lr: float, ref_model: torch.nn.Module | None = None) -> dict[str, float]:
    """Run the K optimizer steps on one rollout batch; return averaged ``train/`` metrics."""
    K, temperature, config = cfg.ppo_n_minibatches, cfg.temperature, loss_config(cfg)
    forward_args = (batch.tokens_B_N, batch.attention_B_N, temperature)
    old_B_T = None
    if cfg.anchor_logp == "rollout":
        old_B_T = batch.inf_logprobs_B_T
    elif K > 1:
        with torch.no_grad():
            old_B_T = token_logprobs(model, *forward_args)
    ref_B_T = None
    if ref_model is not None:
        with torch.no_grad():
            ref_B_T = token_logprobs(ref_model, *forward_args)
    for group in optimizer.param_groups:
        group["lr"] = lr

    sums: dict[str, float] = defaultdict(float)
    for idx in torch.arange(batch.tokens_B_N.shape[0]).tensor_split(K):
        logprobs_B_T = token_logprobs(model, batch.tokens_B_N[idx], batch.attention_B_N[idx], temperature)
        loss, metrics = compute_loss(
            cfg.policy_loss, logprobs_B_T, logprobs_B_T.detach() if old_B_T is None else old_B_T[idx],
            batch.inf_logprobs_B_T[idx], batch.advantages_B[idx], batch.mask_B_T[idx],
            ref_logprobs=None if ref_B_T is None else ref_B_T[idx], config=config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm or float("inf"))
        optimizer.step()
        metrics.update(loss=float(loss.detach()), grad_norm=float(grad_norm))
        for key, value in metrics.items():
            sums[key] += value
    out = {f"train/{k}": v / K for k, v in sums.items()}
    out["train/active_tokens"] = sums["active_tokens"]  # a count: summed, not averaged
    out["train/lr"] = lr
    out["train/minibatches"] = K
    return out
