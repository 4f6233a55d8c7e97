"""Group-relative advantages (GRPO / Dr. GRPO).

A group is the G completions sampled for one prompt; each completion's advantage is its
reward relative to the group. Groups are along the last dimension, so a (G,) tensor or a
batch of groups (N, G) both work.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlstream.core.config import ADVANTAGE_METHODS, TOKEN_ADVANTAGE_METHODS

_STD_EPS = 1e-8


def group_advantages(rewards_G: Tensor, *, scale_std: bool = True) -> Tensor:
    """Advantages ``A_i = (r_i - mean r) / (std r + 1e-8)`` within each group.

    - std is the *population* std (``correction=0``, divide by G): the group is the
      whole population being normalised, not a sample of a larger one, and it keeps
      G=2 groups at A = ±1 exactly instead of ±1/sqrt(2).
    - A std below 1e-8 is replaced by 1, so all-equal rewards give A = 0 (no signal)
      instead of amplifying float noise.
    - ``scale_std=False`` is Dr. GRPO: mean-centering only, no std division (avoids the
      difficulty bias of up-weighting low-variance groups).
    - A group of size 1 has no baseline: every entry is NaN, the caller must drop it.

    Integer / bool rewards are promoted to the default float dtype; float dtypes are kept.

    One group on the CPU (a 1-D tensor: what the trainer passes, once per group) is computed
    with Python floats (float64) and rounded to its dtype once, so it may differ from the
    tensor formula below (batches of groups) in the last bit; a function of the group alone
    either way. Eight tensor ops on G = 8 numbers cost ~40 us, the floats ~5 us (32 groups
    a step).
    """
    if rewards_G.dim() < 1:
        raise ValueError("rewards must have at least one dimension, got a scalar")
    if not rewards_G.is_floating_point():
        rewards_G = rewards_G.to(torch.get_default_dtype())
    group_size = rewards_G.shape[-1]
    if group_size == 0:
        return rewards_G.clone()
    if group_size == 1:
        return torch.full_like(rewards_G, float("nan"))
    if rewards_G.dim() == 1 and rewards_G.device.type == "cpu":
        return torch.tensor(_one_group(rewards_G.tolist(), scale_std), dtype=rewards_G.dtype)
    centered_G = rewards_G - rewards_G.mean(dim=-1, keepdim=True)
    if not scale_std:
        return centered_G
    std_G = rewards_G.std(dim=-1, correction=0, keepdim=True)
    std_G = torch.where(std_G < _STD_EPS, torch.ones_like(std_G), std_G)
    return centered_G / (std_G + _STD_EPS)


def _one_group(rewards: list[float], scale_std: bool) -> list[float]:
    """``group_advantages`` of one group of G >= 2 rewards, in Python floats."""
    mean = sum(rewards) / len(rewards)
    centered = [r - mean for r in rewards]
    if not scale_std:
        return centered
    std = math.sqrt(sum(c * c for c in centered) / len(centered))
    std = 1.0 if std < _STD_EPS else std  # a NaN std stays NaN (NaN < x is False), as in the tensor formula
    return [c / (std + _STD_EPS) for c in centered]


def finite_values(advantages_G: Tensor) -> bool:
    """Whether every advantage of a group is finite. One group on the CPU is read as Python
    floats (~1 us; ``torch.isfinite(...).all()`` is three dispatches, ~7 us, 32 groups a step)."""
    if advantages_G.dim() == 1 and advantages_G.device.type == "cpu":
        return all(map(math.isfinite, advantages_G.tolist()))
    return bool(torch.isfinite(advantages_G).all())


def compute_advantages(rewards_G: Tensor, method: str = "grpo") -> Tensor:
    """Dispatch by name: ``"grpo"`` (std-scaled) or ``"dr_grpo"`` (mean-centred only)."""
    if method not in ADVANTAGE_METHODS:
        raise ValueError(f"unknown advantage method {method!r}; allowed: {ADVANTAGE_METHODS}")
    return group_advantages(rewards_G, scale_std=(method == "grpo"))


def resolve_advantage(spec: str):
    """``"grpo"``/``"dr_grpo"``, or ``"module:function"`` taking rewards_G and returning
    advantages_G (a user function: imported by name, so the trainer process can load it)."""
    if spec in TOKEN_ADVANTAGE_METHODS:  # no function of the rewards alone
        raise ValueError(f"advantage {spec!r} needs the policy and the samples' turns, not only rewards: the "
                         "trainer computes it (rlstream.trainer.igpo.igpo_advantages)")
    if spec in ADVANTAGE_METHODS:
        return lambda rewards_G: compute_advantages(rewards_G, spec)
    from rlstream.core.imports import import_object

    fn = import_object(spec, "advantage")

    def user_advantage(rewards_G: Tensor) -> Tensor:
        out = torch.as_tensor(fn(rewards_G), dtype=rewards_G.dtype)
        if out.shape != rewards_G.shape:
            raise ValueError(
                f"advantage {spec!r} returned shape {tuple(out.shape)} for rewards {tuple(rewards_G.shape)}")
        return out

    return user_advantage
