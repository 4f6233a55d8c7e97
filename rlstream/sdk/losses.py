"""The seed's GRPO helpers for ``forward_backward_custom``: ``build_grpo_datums(completions)``
turns sampled completions into datums that say which predicted tokens are trained, and
``make_grpo_loss_fn(rewards, ref_logprobs, kl_beta)`` returns the objective over them.

The objective of one group of G completions (the seed's "REINFORCE + KL penalty"), with
``w`` the datum's weights (1 on the completion's tokens, 0 on the prompt's), ``lp`` the
policy's logprobs and ``ref`` the reference's, per predicted token::

    A_i  = (r_i - mean r) / (std r + eps)           population std; std < eps -> A = 0
    loss = mean_i [ -A_i * sum_t w_t lp_t  +  kl_beta * sum_t w_t (lp_t - ref_t) ]

Sums over a completion's tokens, a mean over the group: the scale of the hosted recipe's loss,
so its learning rates carry over. The KL term is the k1 estimator (its gradient pulls the
trained tokens' logprobs down, towards the reference's); ``mean_kl`` reports it per trained
token. The advantage uses the population std, as rlstream's trainer does (a group of two
scores +-1), and all-equal rewards give no signal rather than amplified float noise.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlstream.core.rollout import RolloutSample, to_record
from rlstream.sdk.types import Datum, TensorData

Objective = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def grpo_advantages_G(rewards_G: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(r - mean r) / (std r + eps)`` over the group, population std; a std below ``eps``
    counts as 1, so equal rewards give zeros."""
    centered_G = rewards_G - rewards_G.mean()
    std = rewards_G.std(correction=0)
    return centered_G / ((std if std >= eps else torch.ones_like(std)) + eps)


def grpo_loss_B(advantages_B: torch.Tensor, logprobs_B_T: torch.Tensor, ref_logprobs_B_T: torch.Tensor,
                weights_B_T: torch.Tensor, kl_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the policy-gradient term ``-A * sum(w * lp)`` plus ``kl_beta`` times the
    k1 KL ``sum(w * (lp - ref))``; returns (loss_B, kl_B). Padding carries weight 0."""
    kl_B = (weights_B_T * (logprobs_B_T - ref_logprobs_B_T)).sum(-1)
    return -advantages_B * (weights_B_T * logprobs_B_T).sum(-1) + kl_beta * kl_B, kl_B


def _values(value: Any) -> list:
    """A loss input as a flat list: ``TensorData``, a tensor or a list."""
    if isinstance(value, TensorData):
        return list(value.data)
    if isinstance(value, torch.Tensor):
        return value.detach().flatten().tolist()
    return list(value)


def _datum(completion: Any) -> Datum:
    """One completion's datum: a sampled ``Completion`` (``full_tokens``, ``prompt_len``,
    ``inference_logprobs`` of the generated tokens) or a per-token sample (``tokens``,
    ``loss_mask``, ``logprobs``: a ``RolloutSample``, several turns in one)."""
    if hasattr(completion, "full_tokens"):
        tokens, start = list(completion.full_tokens), completion.prompt_len
        generated = list(completion.inference_logprobs)
        if start < 1 or len(generated) != len(tokens) - start:
            raise ValueError(f"build_grpo_datums: a completion of {len(tokens)} tokens with prompt_len {start} has "
                             f"{len(generated)} inference logprobs; it needs a prompt and one logprob per generated "
                             "token")
        weights = [0.0] * (start - 1) + [1.0] * len(generated)
        sampled = [0.0] * (start - 1) + generated
    elif hasattr(completion, "loss_mask"):
        if isinstance(completion, RolloutSample):
            to_record(completion)  # the worker's checks, with what to fix (InvalidSample)
        tokens = list(completion.tokens)
        weights = [float(m) for m in list(completion.loss_mask)[1:]]
        sampled = [float(x) for x in list(completion.logprobs)[1:]]
    else:
        raise TypeError(f"build_grpo_datums takes sampled completions (full_tokens, prompt_len, inference_logprobs) "
                        f"or RolloutSamples (tokens, loss_mask, logprobs), got {type(completion).__name__}")
    n = len(tokens) - 1  # the model predicts tokens[1:]
    return Datum(tokens=tokens, loss_fn_inputs={
        "target_tokens": TensorData(tokens[1:], "int64", [n]),
        "weights": TensorData(weights, "float32", [n]),  # which predictions are trained
        "logprobs": TensorData(sampled, "float32", [n]),  # the sampler's, aligned to the predictions
    })


def build_grpo_datums(completions: Sequence[Any]) -> list[Datum]:
    """One ``Datum`` per completion, in order: its tokens, and as ``loss_fn_inputs``
    ``target_tokens`` (tokens[1:]), ``weights`` (1 where the prediction is a generated token,
    0 on the prompt) and ``logprobs`` (the sampler's, 0 on the prompt), each one value per
    predicted token, as the trainer's logprobs come (``len(tokens) - 1``)."""
    return [_datum(c) for c in completions]


def make_grpo_loss_fn(rewards: Sequence[float], ref_logprobs: Sequence[Sequence[float]], kl_beta: float = 0.001,
                      eps: float = 1e-8) -> Objective:
    """The objective for ``forward_backward_custom(datums, loss_fn)`` over one group: the
    datums of ``build_grpo_datums`` (any datum with ``weights``; without them every prediction
    is trained), their ``rewards`` and the reference's logprobs (``reference.forward(datums)``
    outputs, one list per datum), in the same order. See the module docstring for the loss."""
    rewards_G = torch.tensor([float(r) for r in rewards], dtype=torch.float32)
    if rewards_G.numel() == 0:
        raise ValueError("make_grpo_loss_fn: no rewards (one per completion of the group)")
    if len(ref_logprobs) != rewards_G.numel():
        raise ValueError(f"make_grpo_loss_fn: {rewards_G.numel()} rewards but {len(ref_logprobs)} reference logprob "
                         "lists; give one of each per datum, in the datums' order")
    if kl_beta < 0:
        raise ValueError(f"make_grpo_loss_fn: kl_beta must be >= 0, got {kl_beta}")
    advantages_G = grpo_advantages_G(rewards_G, eps)
    refs = [torch.tensor(_values(ref), dtype=torch.float32) for ref in ref_logprobs]

    def grpo_loss_fn(data: list[Datum], logprobs_list: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if len(data) != len(refs) or len(logprobs_list) != len(refs):
            raise ValueError(f"the GRPO loss was made for {len(refs)} datums, called with {len(data)}")
        losses, kls, tokens = [], [], 0.0
        for i, (datum, lp_T) in enumerate(zip(data, logprobs_list)):
            given = datum.loss_fn_inputs.get("weights")
            w_T = torch.ones_like(lp_T) if given is None else torch.tensor(_values(given), dtype=lp_T.dtype)
            ref_T = refs[i].to(lp_T.dtype)
            if not len(lp_T) == len(ref_T) == len(w_T):
                raise ValueError(f"datum {i}: {len(lp_T)} policy logprobs, {len(ref_T)} reference logprobs and "
                                 f"{len(w_T)} weights; all three must be one per predicted token (len(tokens) - 1)")
            loss, kl = grpo_loss_B(advantages_G[i:i + 1], lp_T[None], ref_T[None], w_T[None], kl_beta)
            losses.append(loss[0])
            kls.append(float(kl.detach()[0]))
            tokens += float(w_T.sum())
        loss = torch.stack(losses).mean()
        return loss, {"mean_reward": float(rewards_G.mean()), "mean_advantage": float(advantages_G.mean()),
                      "mean_kl": sum(kls) / max(tokens, 1.0), "response_tokens": tokens}

    return grpo_loss_fn
