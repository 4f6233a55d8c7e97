"""Hand-computed checks for group-relative advantages (expected values written literally)."""

from __future__ import annotations

import math

import pytest
import torch

from rlstream.trainer.advantages import ADVANTAGE_METHODS, compute_advantages, finite_values, group_advantages


def close(actual: torch.Tensor, expected: list, tol: float = 1e-6) -> None:
    exp = torch.tensor(expected, dtype=actual.dtype)
    assert torch.allclose(actual, exp, atol=tol, rtol=tol), (actual, exp)


def test_grpo_population_std() -> None:
    # mean 2.5, population var (2.25+0.25+0.25+2.25)/4 = 1.25, std = 1.1180340
    # A = [-1.5, -0.5, 0.5, 1.5] / 1.1180340
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    close(adv, [-1.3416408, -0.4472136, 0.4472136, 1.3416408])


def test_two_completions_are_plus_minus_one() -> None:
    # Population std of {0, 1} is 0.5 -> A = ±0.5/0.5 = ±1 (sample std would give ±0.7071).
    close(group_advantages(torch.tensor([0.0, 1.0])), [-1.0, 1.0])


def test_all_equal_rewards_give_zero_not_nan() -> None:
    close(group_advantages(torch.tensor([3.0, 3.0, 3.0])), [0.0, 0.0, 0.0], tol=0.0)


def test_tiny_std_is_replaced_by_one() -> None:
    # std = 5e-10 < 1e-8 -> divided by (1 + 1e-8): A stays at the raw ±5e-10 deviation.
    adv = group_advantages(torch.tensor([1.0, 1.0 + 1e-9], dtype=torch.float64))
    close(adv, [-5e-10, 5e-10], tol=1e-12)


def test_dr_grpo_only_centres() -> None:
    adv = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), scale_std=False)
    close(adv, [-1.5, -0.5, 0.5, 1.5])
    close(compute_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), "dr_grpo"),
          [-1.5, -0.5, 0.5, 1.5])


def test_group_of_one_is_nan() -> None:
    for method in ADVANTAGE_METHODS:
        adv = compute_advantages(torch.tensor([0.7]), method)
        assert adv.shape == (1,) and math.isnan(adv.item())


def test_batched_groups_along_last_dim() -> None:
    # Row 0: mean 1/3, population std sqrt(2/9) = 0.4714045 -> [-1/3, -1/3, 2/3] / 0.4714045.
    adv = compute_advantages(torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    close(adv, [[-0.7071068, -0.7071068, 1.4142136], [0.0, 0.0, 0.0]])


def test_dtypes() -> None:
    assert group_advantages(torch.tensor([1, 0, 1])).dtype == torch.get_default_dtype()
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64)).dtype == torch.float64
    close(group_advantages(torch.tensor([True, False])), [1.0, -1.0])


def test_empty_group_and_scalar() -> None:
    assert group_advantages(torch.zeros(0)).shape == (0,)
    with pytest.raises(ValueError, match="dimension"):
        group_advantages(torch.tensor(1.0))


def test_compute_advantages_default_and_unknown() -> None:
    close(compute_advantages(torch.tensor([0.0, 1.0])), [-1.0, 1.0])
    with pytest.raises(ValueError, match="dr_grpo"):
        compute_advantages(torch.tensor([0.0, 1.0]), "ppo")


@pytest.mark.parametrize("method", ADVANTAGE_METHODS)
def test_one_group_is_the_batch_formula_to_float32_rounding(method) -> None:
    """A 1-D group (what the trainer passes) is computed with Python floats, a batch of groups
    with tensor ops: the same numbers, each row a function of its own group."""
    gen = torch.Generator().manual_seed(0)
    rewards_N_G = torch.cat([torch.randint(0, 2, (64, 8), generator=gen).float(),  # 0/1 rewards, some all-equal
                             torch.rand(64, 8, generator=gen) * 10 - 5])
    batch_N_G = compute_advantages(rewards_N_G, method)
    one_by_one_N_G = torch.stack([compute_advantages(row_G, method) for row_G in rewards_N_G])
    assert one_by_one_N_G.dtype == torch.float32
    torch.testing.assert_close(one_by_one_N_G, batch_N_G, rtol=2e-7, atol=2e-7)
    assert torch.equal(compute_advantages(torch.tensor([3.0, 3.0, 3.0]), method), torch.zeros(3))
    assert compute_advantages(torch.tensor([float("nan"), 1.0]), method).isnan().all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_values_finds_any_non_finite_advantage(bad):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        ok_G = torch.tensor([0.5, -0.5, 1.0, 0.0], dtype=dtype)
        assert finite_values(ok_G) and finite_values(ok_G[None])  # one group, and a batch of them (tensor path)
        for i in range(4):
            bad_G = ok_G.clone()
            bad_G[i] = bad
            assert not finite_values(bad_G) and not finite_values(bad_G[None]), (dtype, i)
    assert finite_values(torch.tensor([1, 0, -1]))  # integer advantages from a user function
    assert finite_values(torch.tensor([]))
