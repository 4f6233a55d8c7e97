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


# The same group under the other normalisations (igpo_normalization, igpo_ig_weight; docs/design.md
# §15.87 IGPO's normalisation: what an all-failed group teaches), gamma = 0.5 again:
# mean, ig_weight 0.5: r = A (0.15, 0.2, 1.0), B (-0.05, 0.0), C (0.0); sum 1.3, mean 13/60 = 0.216667;
#   centred (-0.066667, -0.016667, 0.783333, -0.266667, -0.216667, -0.216667), not divided by a std:
#   A: A_3 = 0.783333, A_2 = -0.016667 + 0.5 * 0.783333 = 0.375, A_1 = -0.066667 + 0.5 * 0.375 = 0.120833
#   B: B_2 = -0.216667, B_1 = -0.266667 + 0.5 * (-0.216667) = -0.375;  C: C_1 = -0.216667
# joint, ig_weight 0.5: the same centred rewards over their std (squares sum 0.783333, variance 0.130556,
#   std 0.361325), so each advantage above / 0.361325.
# separate, ig_weight 1: gains with 0 on each last turn, (0.3, 0.4, 0, -0.1, 0, 0): mean 0.1, deviations
#   (0.2, 0.3, -0.1, -0.2, -0.1, -0.1), variance 0.2 / 6, std 0.182574,
#   z = (1.095445, 1.643168, -0.547723, -1.095445, -0.547723, -0.547723);
#   outcomes with 0 on every turn but the last, (0, 0, 1, 0, 0, 0): mean 1/6, std sqrt(5)/6 = 0.372678,
#   z(0) = -0.447214, z(1) = 2.236068; summed: A (0.648232, 1.195954, 1.688345), B (-1.542659, -0.994936),
#   C (-0.994936); A_3 = 1.688345, A_2 = 1.195954 + 0.5 * 1.688345 = 2.040127,
#   A_1 = 0.648232 + 0.5 * 2.040127 = 1.668295; B_2 = -0.994936, B_1 = -1.542659 - 0.5 * 0.994936 = -2.040127
# separate, ig_weight 0.5: 0.5 z(gains) + z(outcomes) = A (0.100509, 0.374370, 1.962207),
#   B (-0.994936, -0.721075), C (-0.721075); A_2 = 0.374370 + 0.5 * 1.962207 = 1.355474,
#   A_1 = 0.100509 + 0.5 * 1.355474 = 0.778246; B_1 = -0.994936 - 0.5 * 0.721075 = -1.355474
OTHER_NORMALIZATIONS = {
    ("mean", 0.5): [[0.120833, 0.375, 0.783333], [-0.375, -0.216667], [-0.216667]],
    ("joint", 0.5): [[0.120833 / 0.361325, 0.375 / 0.361325, 0.783333 / 0.361325],
                     [-0.375 / 0.361325, -0.216667 / 0.361325], [-0.216667 / 0.361325]],
    ("separate", 1.0): [[1.668295, 2.040127, 1.688345], [-2.040127, -0.994936], [-0.994936]],
    ("separate", 0.5): [[0.778246, 1.355474, 1.962207], [-1.355474, -0.721075], [-0.721075]],
}


@pytest.mark.parametrize(("normalization", "ig_weight"), list(OTHER_NORMALIZATIONS))
def test_the_other_normalisations_and_the_gains_weight_against_the_hand_computation(normalization, ig_weight):
    probs = [torch.tensor(p, dtype=torch.float64) for p in PROBS]
    got = igpo.group_turn_advantages(probs, OUTCOMES, GAMMA, normalization=normalization, ig_weight=ig_weight)
    for g, want in zip(got, OTHER_NORMALIZATIONS[normalization, ig_weight]):
        close(g.tolist(), want)
    # the defaults are the paper's: joint, weight 1
    for g, want in zip(igpo.group_turn_advantages(probs, OUTCOMES, GAMMA, normalization="joint", ig_weight=1.0),
                       EXPECTED):
        close(g.tolist(), want)
    with pytest.raises(ValueError, match="normalization"):
        igpo.group_turn_advantages(probs, OUTCOMES, GAMMA, normalization="z")


def test_an_all_failed_group_of_small_gains_gets_unit_advantages_from_the_joint_z_score_not_from_the_mean():
    """The cause the example met (docs/design.md §15.87 IGPO's normalisation: what an all-failed
    group teaches): two trajectories whose lookup raised the answer's
    probability a little and failed, beside two one-turn guesses, every outcome 0. The joint
    z-score gives each failed answer turn the same push down (-0.654654: the gains 0.02 and 0.01,
    mean 0.005, std 0.007638) however small the gains are; the mean keeps their scale (-0.005)."""
    outcomes = [0.0, 0.0, 0.0, 0.0]
    for scale in (1.0, 0.1):
        probs = [torch.tensor(p, dtype=torch.float64) * scale for p in ([0.1, 0.12], [0.1, 0.11], [0.0], [0.0])]
        joint = igpo.group_turn_advantages(probs, outcomes, 0.0)
        close([float(joint[0][1]), float(joint[1][1]), float(joint[2][0])], [-0.654654] * 3, tol=1e-4)  # + 1e-8
        mean = igpo.group_turn_advantages(probs, outcomes, 0.0, normalization="mean")
        close([float(mean[0][1]), float(mean[1][1]), float(mean[2][0])], [-0.005 * scale] * 3)
        close([float(mean[0][0]), float(mean[1][0])], [0.015 * scale, 0.005 * scale])


def test_the_trainer_passes_its_normalisation_and_weight(monkeypatch):
    from types import SimpleNamespace

    from rlstream.trainer import trainer as trainer_module
    seen = {}

    def fake(samples, model, **kwargs):
        seen.update(kwargs)
        return torch.zeros(len(samples)), [torch.zeros(1) for _ in samples]

    monkeypatch.setattr(trainer_module, "igpo_advantages", fake)
    cfg = legacy_config(advantage="igpo", igpo_normalization="separate", igpo_ig_weight=0.25, igpo_gamma=0.9)
    me = SimpleNamespace(advantage_fn=None, cfg=cfg, model=None, pad_id=0, device=CPU, precision=None)
    trainer_module.Trainer.set_advantages(me, SimpleNamespace(samples=[trajectory([[6]], [], [], 1.0)]))
    assert (seen["normalization"], seen["ig_weight"], seen["gamma"]) == ("separate", 0.25, 0.9)


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


def test_a_multi_turn_sample_without_a_prompt_is_refused_with_why():
    # its first turn starts at token 0: no prefix to score the answer after (the forward would have nothing
    # before the answer's first token)
    samples = [trajectory([[6], [7]], [[13]], [5, 6], 1.0, prompt=()), trajectory([[6], [7]], [[13]], [5, 6], 0.0)]
    with pytest.raises(ValueError, match="first turn starts at its first token"):
        igpo.igpo_advantages(samples, build_model(0), gamma=0.9, pad_id=0, device=CPU, temperature=1.0)


def test_the_answer_is_scored_by_the_policy_as_one_row_each():
    model = build_model(0).eval()
    prefixes, answers = [[3, 4, 5], [3, 4, 5, 6, 7, 8, 9]], [[5, 6], [7]]
    seen: list[int] = []
    model.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    got = igpo.mean_answer_logprobs(model, prefixes, answers, pad_id=0, device=CPU, temperature=0.7)
    # 8 tokens a row; the first answer token (row 0's position 3) is predicted at position 2: the output head
    # runs on positions 2..7 only (docs/design.md §15.97 Logits only where a target is trained)
    assert seen == [6]
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
    assert (legacy_config().igpo_normalization, legacy_config().igpo_ig_weight) == ("joint", 1.0)  # the paper's
    cfg = legacy_config(advantage="igpo", igpo_normalization="mean", igpo_ig_weight=0.5)
    assert (cfg.igpo_normalization, cfg.igpo_ig_weight) == ("mean", 0.5)
    for field, bad in (("igpo_normalization", "zscore"), ("igpo_ig_weight", -1.0), ("igpo_ig_weight", 101.0)):
        with pytest.raises(ConfigError, match=field):
            validate_config({**legacy_config().model_dump(), field: bad})
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


def test_igpo_gives_a_one_turn_sample_without_a_prompt_its_advantage_on_every_trained_target():
    # loss_mask [1, 1, 1, 1, 1]: targets 0..3 (tokens 1..4) are trained; IGPO on one turn is GRPO
    out = igpo.token_advantages_T(torch.tensor([0.7]), igpo.turn_spans([1, 1, 1, 1, 1]), 5)
    assert out.tolist() == pytest.approx([0.7] * 4)
