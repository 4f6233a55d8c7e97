"""Inputs and a runner for the hand-computed loss tests (test_losses*.py): logprobs built
from ratios (``logprobs = old + log r``, ``old - inf = log w``) so every expected number is
plain arithmetic on r, A and w."""
from __future__ import annotations

import pytest
import torch

from rlstream.trainer.losses import LossConfig, compute_loss

F64 = torch.float64


def make(ratios, adv, mask=None, *, lp=None, w_raw=None, dtype=F64):
    """(logprobs, old, inf, adv, mask) with exp(lp-old) = ratios, exp(old-inf) = w_raw."""
    r = torch.tensor(ratios, dtype=dtype)
    if lp is None:
        old = torch.full_like(r, -1.0)
        lp_t = old + torch.log(r)
    else:
        lp_t = torch.tensor(lp, dtype=dtype)
        old = lp_t - torch.log(r)
    inf = old.clone() if w_raw is None else old - torch.log(torch.tensor(w_raw, dtype=dtype))
    mask_t = torch.ones_like(r) if mask is None else torch.tensor(mask, dtype=dtype)
    return lp_t.detach().requires_grad_(), old, inf, torch.tensor(adv, dtype=dtype), mask_t


def run(policy, inputs, ref=None, **cfg):
    lp, old, inf, adv, mask = inputs
    lp.grad = None
    loss, metrics = compute_loss(policy, lp, old, inf, adv, mask, ref, config=LossConfig(**cfg))
    loss.backward()
    return loss.item(), metrics, lp.grad.tolist()


def approx(x, tol=1e-6):
    return pytest.approx(x, abs=tol, rel=tol)


# Shared PPO batch. seq0 (A=+1): r = 1.1, 1.5, 0.5. seq1 (A=-2): r = 0.7, 1.3, <masked>.
PPO = dict(ratios=[[1.1, 1.5, 0.5], [0.7, 1.3, 1.0]], adv=[1.0, -2.0],
           mask=[[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
