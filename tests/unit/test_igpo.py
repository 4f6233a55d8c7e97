"""IGPO (trainer/igpo.py; docs/design.md §15.84 Per-token advantages: a turn's tokens carry its
advantage): the advantages of a hand-made group of trajectories, number by number against a
hand computation of the formula; turns from the loss mask; the answer scored by the policy
itself; one turn is GRPO; and the per-token advantages reach the loss (collate, micro-batches,
compute_loss)."""
from __future__ import annotations

import math

import msgpack
import pytest
import torch
from factories import legacy_config

from rlstream.builtin.tiny_model import build_model
from rlstream.core.codec import decode, encode
from rlstream.core.config import validate_config
from rlstream.core.errors import ConfigError
from rlstream.core.messages import RolloutRecord
from rlstream.trainer import igpo
from rlstream.trainer.advantages import group_advantages, resolve_advantage
from rlstream.trainer.batch import Group, collate, token_advantages_of
from rlstream.trainer.losses import compute_loss
from rlstream.trainer.micro_batch import placeholder, rows_of
from rlstream.trainer.policy_model import token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py
CPU = torch.device("cpu")

# The hand-made group: answer probabilities p_0..p_(T-1) (p_t after the history up to turn t) and outcomes.
#   A: 3 turns, p = (0.2, 0.5, 0.9), outcome 1  ->  r = (0.5 - 0.2, 0.9 - 0.5, 1) = (0.3, 0.4, 1.0)
#   B: 2 turns, p = (0.2, 0.1),      outcome 0  ->  r = (0.1 - 0.2, 0)           = (-0.1, 0.0)
#   C: 1 turn,  (no gain),           outcome 0  ->  r = (0.0,)
# All K = 6 rewards: sum 1.6, mean 4/15 = 0.266667; deviations (1/30, 2/15, 11/15, -11/30, -4/15, -4/15);
# squares sum 5/6, population variance 5/36, std sqrt(5)/6 = 0.372678; z = deviation / std:
#   (0.089443, 0.357771, 1.967740, -0.983870, -0.715542, -0.715542)
# Discounted sums, gamma = 0.5:
#   A: A_3 = 1.967740, A_2 = 0.357771 + 0.5 * 1.967740 = 1.341641, A_1 = 0.089443 + 0.5 * 1.341641 = 0.760263
#   B: B_2 = -0.715542, B_1 = -0.983870 + 0.5 * (-0.715542) = -1.341641
#   C: C_1 = -0.715542
PROBS = [[0.2, 0.5, 0.9], [0.2, 0.1], [0.0]]
OUTCOMES = [1.0, 0.0, 0.0]
GAMMA = 0.5
REWARDS = [[0.3, 0.4, 1.0], [-0.1, 0.0], [0.0]]
Z = [0.089443, 0.357771, 1.967740, -0.983870, -0.715542, -0.715542]
EXPECTED = [[0.760263, 1.341641, 1.967740], [-1.341641, -0.715542], [-0.715542]]


def close(got, want, tol=1e-5):
    assert len(got) == len(want) and all(abs(g - w) < tol for g, w in zip(got, want)), (got, want)


def test_turn_rewards_zscore_and_discounted_sums_against_the_hand_computation():
    probs = [torch.tensor(p, dtype=torch.float64) for p in PROBS]
    for p_T, outcome, want in zip(probs, OUTCOMES, REWARDS):
        close(igpo.turn_rewards_T(p_T, outcome).tolist(), want)
    close(igpo.group_normalized_K(torch.tensor(sum(REWARDS, []), dtype=torch.float64)).tolist(), Z)
    close(igpo.discounted_returns_T(torch.tensor([1.0, 2.0, 4.0]), 0.5).tolist(), [1 + 0.5 * 2 + 0.25 * 4, 4.0, 4.0])
    for got, want in zip(igpo.group_turn_advantages(probs, OUTCOMES, GAMMA), EXPECTED):
        close(got.tolist(), want)
    # p_t is the geometric mean of the answer tokens' probabilities
    close(igpo.answer_probs_from_logprobs(torch.tensor([math.log(0.5)])).tolist(), [0.5])


def test_gamma_zero_keeps_each_turn_its_own_normalised_reward_and_one_turn_groups_are_grpo():
    probs = [torch.tensor(p, dtype=torch.float64) for p in PROBS]
    got = igpo.group_turn_advantages(probs, OUTCOMES, 0.0)
    close(torch.cat(got).tolist(), Z)
    one_turn = igpo.group_turn_advantages([torch.zeros(1, dtype=torch.float64)] * 4, [1.0, 0.0, 0.0, 1.0], 0.99)
    close(torch.cat(one_turn).tolist(), group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0])).tolist())


def test_turns_are_the_runs_of_ones_in_the_loss_mask():
    assert igpo.turn_spans([0, 0, 1, 1, 0, 0, 1, 0, 1, 1]) == [(2, 4), (6, 7), (8, 10)]
    assert igpo.turn_spans([0, 1]) == [(1, 2)]
    # targets are aligned as the trainer's logprobs: token i is target i - 1
    got = igpo.token_advantages_T(torch.tensor([1.0, 2.0]), [(2, 4), (6, 7)], 8).tolist()
    assert got == [0.0, 1.0, 1.0, 0.0, 0.0, 2.0, 0.0]


def trajectory(turns: list[list[int]], between: list[list[int]], answer: list[int], reward: float,
               prompt=(3, 4, 5)) -> RolloutRecord:
    """A sample of sampled ``turns`` with ``between[t]`` (an observation) after turn t."""
    tokens, mask = list(prompt), [0] * len(prompt)
    for t, turn in enumerate(turns):
        tokens += turn
        mask += [1] * len(turn)
        if t < len(turns) - 1:
            tokens += between[t]
            mask += [0] * len(between[t])
    return RolloutRecord(tokens=tokens, logprobs=[0.0] * len(tokens), loss_mask=mask, reward=reward,
                         answer_tokens=answer)


def test_igpo_advantages_score_the_prefix_before_each_turn(monkeypatch):
    """The policy is asked for p_t on the prompt, then on everything before each later turn; the
    answer probabilities it gives make the hand-made group above, whose advantages land on each
    turn's tokens."""
    samples = [trajectory([[6], [7, 8], [9]], [[10, 11], [12]], [5, 6], 1.0),
               trajectory([[6], [7]], [[13]], [5, 6], 0.0),
               trajectory([[9, 9]], [], [5, 6], 0.0)]
    asked = []
    table = {(3, 4, 5): 0.2, (3, 4, 5, 6, 10, 11): 0.5, (3, 4, 5, 6, 10, 11, 7, 8, 12): 0.9, (3, 4, 5, 6, 13): 0.1}

    def fake(model, prefixes, answers, **kwargs):
        asked.extend((tuple(p), tuple(a)) for p, a in zip(prefixes, answers))
        return torch.log(torch.tensor([table[tuple(p)] for p in prefixes], dtype=torch.float64))

    monkeypatch.setattr(igpo, "mean_answer_logprobs", fake)
    adv_G, tokens = igpo.igpo_advantages(samples, None, gamma=GAMMA, pad_id=0, device=CPU, temperature=1.0)
    assert [p for p, _ in asked] == [(3, 4, 5), (3, 4, 5, 6, 10, 11), (3, 4, 5, 6, 10, 11, 7, 8, 12),
                                     (3, 4, 5), (3, 4, 5, 6, 13)]  # none for the one-turn trajectory
    assert all(a == (5, 6) for _, a in asked)
    close(adv_G.tolist(), [EXPECTED[0][0], EXPECTED[1][0], EXPECTED[2][0]])
    (a1, a2, a3), (b1, b2), (c1,) = EXPECTED
    close(tokens[0].tolist(), [0, 0, a1, 0, 0, a2, a2, 0, a3])  # targets of tokens 1..9
    close(tokens[1].tolist(), [0, 0, b1, 0, b2])
    close(tokens[2].tolist(), [0, 0, c1, c1])


def test_a_multi_turn_sample_without_an_answer_is_refused():
    samples = [trajectory([[6], [7]], [[13]], [], 1.0), trajectory([[6], [7]], [[13]], [], 0.0)]
    with pytest.raises(ValueError, match="no answer_tokens"):
        igpo.igpo_advantages(samples, build_model(0), gamma=0.9, pad_id=0, device=CPU, temperature=1.0)


def test_the_answer_is_scored_by_the_policy_as_one_row_each():
    model = build_model(0).eval()
    prefixes, answers = [[3, 4, 5], [3, 4, 5, 6, 7, 8, 9]], [[5, 6], [7]]
    got = igpo.mean_answer_logprobs(model, prefixes, answers, pad_id=0, device=CPU, temperature=0.7)
    for g, p, a in zip(got.tolist(), prefixes, answers):
        row = torch.tensor([p + a])
        with torch.no_grad():
            lp = token_logprobs(model, row, torch.ones_like(row), 0.7)[0, len(p) - 1:]
        assert abs(g - float(lp.mean())) < 1e-5


def test_answer_tokens_travel_on_the_wire_and_default_to_none():
    s = trajectory([[6], [7]], [[13]], [5, 6], 1.0)
    assert list(decode(encode(s)).answer_tokens) == [5, 6]
    plain = RolloutRecord(tokens=[1, 2], logprobs=[0.0, 0.0], loss_mask=[0, 1], reward=0.0)
    assert len(decode(encode(plain)).answer_tokens) == 0
    # a sample written before the field existed (an older worker, an archive segment) still decodes
    data = msgpack.unpackb(encode(plain), raw=False)
    del data["answer_tokens"]
    old = decode(msgpack.packb(data, use_bin_type=True))
    assert len(old.answer_tokens) == 0 and list(old.tokens) == [1, 2]


def test_config_names_igpo_and_its_gamma():
    cfg = legacy_config(advantage="igpo", igpo_gamma=0.9)
    assert cfg.advantage == "igpo" and cfg.igpo_gamma == 0.9
    assert legacy_config().igpo_gamma == 0.99
    with pytest.raises(ConfigError, match="igpo_gamma"):
        validate_config({**legacy_config().model_dump(), "igpo_gamma": 1.5})
    with pytest.raises(ValueError, match="needs the policy"):
        resolve_advantage("igpo")


def test_per_token_advantages_reach_the_loss():
    """collate lays each sample's per-token advantages on its targets (a scalar group beside it on
    every target), micro-batches cut them with the rows, and compute_loss with (B, T) advantages
    equal to the scalar on every token is the scalar loss."""
    a = RolloutRecord(tokens=[3, 4, 5, 6], logprobs=[0.0] * 4, loss_mask=[0, 1, 0, 1], reward=0.0)
    b = RolloutRecord(tokens=[3, 4, 5], logprobs=[0.0] * 3, loss_mask=[0, 1, 1], reward=0.0)
    g1 = Group("g1", 1, {"a": ("1-0", a)}, advantages_G=torch.tensor([9.0]),
               token_advantages=[torch.tensor([1.0, 2.0, 3.0])])
    g2 = Group("g2", 1, {"b": ("1-1", b)}, advantages_G=torch.tensor([-1.5]))
    assert token_advantages_of([g2]) is None  # scalar groups only: the batch is built as it always was
    per_token = token_advantages_of([g1, g2])
    batch = collate([a, b], torch.tensor([9.0, -1.5]), 0, CPU, per_token)
    assert batch.advantages_B_T.tolist() == [[1.0, 2.0, 3.0], [-1.5, -1.5, -1.5]]
    assert collate([a, b], torch.tensor([9.0, -1.5]), 0, CPU).advantages_B_T is None
    assert rows_of(batch, torch.tensor([1])).advantages_B_T.tolist() == [[-1.5, -1.5]]
    assert placeholder(batch).advantages_B_T.tolist() == [[0.0]]

    torch.manual_seed(0)
    lp_B_T = torch.randn(2, 3, requires_grad=True)
    old_B_T, mask_B_T = lp_B_T.detach() + 0.1 * torch.randn(2, 3), batch.mask_B_T
    adv_B = torch.tensor([0.7, -1.2])
    for loss in ("grpo", "gspo", "cispo", "dro"):
        scalar, m1 = compute_loss(loss, lp_B_T, old_B_T, old_B_T, adv_B, mask_B_T)
        tokens, m2 = compute_loss(loss, lp_B_T, old_B_T, old_B_T, adv_B[:, None].expand(2, 3).clone(), mask_B_T)
        assert torch.equal(scalar, tokens) and m1 == m2
    # per token: each token's surrogate with its own advantage (grpo, ratio inside the clip)
    adv_B_T = torch.tensor([[0.0, 2.0, -1.0], [0.5, 0.5, 0.0]])
    got, _ = compute_loss("grpo", lp_B_T, lp_B_T.detach(), lp_B_T.detach(), adv_B_T, mask_B_T)
    active = mask_B_T != 0
    assert torch.allclose(got, -(adv_B_T[active]).sum() / active.sum())
    with pytest.raises(ValueError, match="one per token"):
        compute_loss("grpo", lp_B_T, old_B_T, old_B_T, torch.zeros(2, 2), mask_B_T)
