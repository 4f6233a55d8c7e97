"""IGPO: turn-level information-gain advantages (Wang et al., arXiv 2510.14967), one per token.

A trajectory is one sample whose turns are the runs of 1s in its ``loss_mask`` (what the policy
sampled; the 0s between them are the environment's and the chat template's tokens). For turn
t < T the reward is the information gain ``r_t = p_t - p_(t-1)``, where
``p_t = exp(mean_j log pi(a_j | prefix_t, a_<j))`` is the current policy's probability of the
ground-truth answer ``a`` (the sample's ``answer_tokens``) after the history up to turn t:
``prefix_t`` is every token before turn t+1's first sampled one (turn t's output, the
observation after it, the template's generation prompt), and ``p_0`` is with the prompt alone
(every token before turn 1), as the paper's ``o_(<=0)``. The last turn's reward is the outcome
reward (the sample's ``reward``). All turn rewards of the group are z-scored together (GRPO's
formula over the group's K turns), and turn t's advantage is the discounted sum
``sum_(k>=t) gamma^(k-t) rnorm_k``; every token of turn t gets it
(docs/design.md §15.84 Per-token advantages: a turn's tokens carry its advantage).

That z-score is ``normalization = "joint"`` (the paper's, the default). Two others
(§15.87 IGPO's normalisation: what an all-failed group teaches): ``"mean"`` subtracts the
group's mean turn reward and keeps the units (a gain is a difference of probabilities, the
outcome a reward), and ``"separate"`` (the cookbook's ``compute_turn_advantages``) z-scores the
gains and the outcomes each on their own and adds them. ``ig_weight`` is the gains' weight
against the outcome: it multiplies each gain before a joint or mean normalisation, and the
normalised gains after a separate one (a z-score would cancel it before).

The math is the pure functions below; ``igpo_advantages`` runs the policy (the trainer's model,
so p_t is the current policy's, not the sampler's) on one batch of (prefix + answer) rows per
group: T rows (p_0 .. p_(T-1)) for a trajectory of T >= 2 turns; a one-turn trajectory needs
none (its only reward is the outcome), so IGPO on one-turn groups is GRPO.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rlstream.core.config import IGPO_NORMALIZATIONS
from rlstream.core.messages import RolloutRecord
from rlstream.trainer.advantages import group_advantages
from rlstream.trainer.policy_model import token_logprobs
from rlstream.trainer.precision import Precision


def turn_spans(loss_mask: list[int] | bytes) -> list[tuple[int, int]]:
    """The turns of a sample: ``[start, end)`` token positions of each run of 1s in its mask."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, m in enumerate(loss_mask):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(loss_mask)))
    return spans


def answer_probs_from_logprobs(mean_logprobs_T: Tensor) -> Tensor:
    """``p_t = exp(mean log pi(answer | prefix_t))``: the geometric mean of the answer tokens'
    probabilities (length-independent), from each prefix's mean answer logprob."""
    return torch.exp(mean_logprobs_T)


def turn_rewards_T(answer_probs_T: Tensor, outcome: float, ig_weight: float = 1.0) -> Tensor:
    """The rewards of a trajectory of T turns from ``answer_probs_T`` = (p_0, ..., p_(T-1)):
    ``r_t = ig_weight * (p_t - p_(t-1))`` for turns t = 1..T-1 and ``r_T = outcome``."""
    gains = ig_weight * (answer_probs_T[1:] - answer_probs_T[:-1])
    return torch.cat([gains, torch.tensor([outcome], dtype=answer_probs_T.dtype)])


def group_normalized_K(rewards_K: Tensor) -> Tensor:
    """GRPO's z-score over all K turn rewards of a group at once (population std; a std below
    1e-8 counts as 1, so all-equal rewards give 0; one reward alone gives NaN, which rejects the
    group as GRPO does a group of one)."""
    return group_advantages(rewards_K, scale_std=True)


def group_centred_K(rewards_K: Tensor) -> Tensor:
    """``normalization = "mean"``: each of the group's K turn rewards minus their mean, not divided
    by their std (dr_grpo's formula over the turns): a group of small gains and failed outcomes
    gets small advantages instead of unit-variance ones."""
    return group_advantages(rewards_K, scale_std=False)


def separately_normalized_K(gains_K: Tensor, outcomes_K: Tensor, ig_weight: float) -> Tensor:
    """``normalization = "separate"`` (the cookbook's ``compute_turn_advantages``): the K turns'
    gains (0 on each trajectory's last turn) and outcomes (0 on every turn but the last) each
    z-scored over the group's K turns, then ``ig_weight * z(gains) + z(outcomes)``."""
    return ig_weight * group_normalized_K(gains_K) + group_normalized_K(outcomes_K)


def discounted_returns_T(rewards_T: Tensor, gamma: float) -> Tensor:
    """``A_t = sum_(k>=t) gamma^(k-t) r_k`` for each turn t of one trajectory."""
    out_T = torch.empty_like(rewards_T)
    running = 0.0
    for t in range(len(rewards_T) - 1, -1, -1):
        running = float(rewards_T[t]) + gamma * running
        out_T[t] = running
    return out_T


def token_advantages_T(turn_advantages_T: Tensor, spans: list[tuple[int, int]], n_tokens: int) -> Tensor:
    """Turn advantages spread over a sample's targets: (n_tokens - 1,), aligned as the trainer's
    logprobs are (target i is token i + 1); each turn's tokens get its advantage, every other
    position (prompt, observations, all masked) 0."""
    out = torch.zeros(n_tokens - 1, dtype=turn_advantages_T.dtype)
    for (start, end), adv in zip(spans, turn_advantages_T.tolist()):
        out[max(start - 1, 0):end - 1] = adv  # token 0 is no target: a turn from it starts at target 0
    return out


def group_turn_advantages(answer_probs: list[Tensor], outcomes: list[float], gamma: float, *,
                          normalization: str = "joint", ig_weight: float = 1.0) -> list[Tensor]:
    """Each trajectory's turn advantages from its answer probabilities (p_0..p_(T-1), T values)
    and its outcome reward: turn rewards, the group's normalisation over all of them
    (``normalization``: joint z-score, mean only, or gains and outcomes z-scored separately),
    discounted sums."""
    if normalization == "separate":
        rewards = [turn_rewards_T(p_T, r) for p_T, r in zip(answer_probs, outcomes)]
        gains_K = torch.cat([torch.cat([r_T[:-1], r_T.new_zeros(1)]) for r_T in rewards])
        outcomes_K = torch.cat([torch.cat([r_T.new_zeros(len(r_T) - 1), r_T[-1:]]) for r_T in rewards])
        normalized_K = separately_normalized_K(gains_K, outcomes_K, ig_weight)
    elif normalization in ("joint", "mean"):
        rewards = [turn_rewards_T(p_T, r, ig_weight) for p_T, r in zip(answer_probs, outcomes)]
        rewards_K = torch.cat(rewards)
        normalized_K = group_normalized_K(rewards_K) if normalization == "joint" else group_centred_K(rewards_K)
    else:
        raise ValueError(f"IGPO normalization {normalization!r}: one of {', '.join(IGPO_NORMALIZATIONS)}")
    out, k = [], 0
    for r_T in rewards:
        out.append(discounted_returns_T(normalized_K[k:k + len(r_T)], gamma))
        k += len(r_T)
    return out


@torch.no_grad()
def mean_answer_logprobs(model: torch.nn.Module, prefixes: list[list[int]], answers: list[list[int]], *,
                         pad_id: int, device: torch.device, temperature: float,
                         precision: Precision | None = None) -> Tensor:
    """``mean_j log pi(a_j | prefix, a_<j)`` of each (prefix, answer) pair, one forward of the
    right-padded rows (prefix + answer), at the training temperature (the policy the loss trains).
    The logits start at the shortest prefix's end: no answer is scored before it (docs/design.md
    §15.97 Logits only where a target is trained)."""
    rows = [p + a for p, a in zip(prefixes, answers)]
    N = max(len(r) for r in rows)
    tokens_B_N = torch.full((len(rows), N), pad_id, dtype=torch.long)
    attention_B_N = torch.zeros((len(rows), N), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens_B_N[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        attention_B_N[i, :len(r)] = 1
    first = min(len(p) for p in prefixes) - 1  # the earliest answer token's target column
    with (precision or Precision()).autocast():
        logprobs_B_T = token_logprobs(model, tokens_B_N.to(device), attention_B_N.to(device), temperature, first)
    logprobs_B_T = logprobs_B_T.float().cpu()
    # answer token j sits at position len(prefix) + j, its logprob at target len(prefix) + j - 1 (column - first)
    return torch.stack([logprobs_B_T[i, len(p) - 1 - first:len(p) - 1 - first + len(a)].mean()
                        for i, (p, a) in enumerate(zip(prefixes, answers))])


def igpo_advantages(samples: list[RolloutRecord], model: torch.nn.Module, *, gamma: float, pad_id: int,
                    device: torch.device, temperature: float, precision: Precision | None = None,
                    normalization: str = "joint", ig_weight: float = 1.0) -> tuple[Tensor, list[Tensor]]:
    """A group's IGPO advantages: (advantages_G, each sample's first turn's, what
    ``dynamic_filter_fn`` and the metrics see; the per-token advantages, one (len(tokens) - 1,)
    tensor per sample). A sample of more than one turn needs ``answer_tokens``."""
    spans = [turn_spans(s.loss_mask) for s in samples]
    prefixes, answers, owner = [], [], []
    for i, (s, turns) in enumerate(zip(samples, spans)):
        if len(turns) < 2:
            continue
        if not len(s.answer_tokens):
            raise ValueError(f"IGPO: sample {s.sample_id or i} has {len(turns)} turns and no answer_tokens (the "
                             "ground-truth answer's token ids the information gain is measured on)")
        if turns[0][0] == 0:
            raise ValueError(f"IGPO: sample {s.sample_id or i}'s first turn starts at its first token (loss_mask[0] "
                             "= 1): there is no prompt before it to score the answer after; start the sample with "
                             "its prompt, masked")
        for start, _ in turns:  # the prefixes before turns 1..T: p_0..p_(T-1)
            prefixes.append(list(s.tokens[:start]))
            answers.append(list(s.answer_tokens))
            owner.append(i)
    probs: list[list[float]] = [[] for _ in samples]
    if prefixes:
        p_R = answer_probs_from_logprobs(mean_answer_logprobs(model, prefixes, answers, pad_id=pad_id, device=device,
                                                              temperature=temperature, precision=precision))
        for i, p in zip(owner, p_R.tolist()):
            probs[i].append(p)
    # one turn: no gain to measure (p_0 is unused), only the outcome
    answer_probs = [torch.tensor(p if len(turns) > 1 else [0.0], dtype=torch.float64) for p, turns in zip(probs, spans)]
    turn_adv = group_turn_advantages(answer_probs, [s.reward for s in samples], gamma,
                                     normalization=normalization, ig_weight=ig_weight)
    tokens = [token_advantages_T(a_T, turns, len(s.tokens)).float() for a_T, turns, s in zip(turn_adv, spans, samples)]
    return torch.tensor([float(a_T[0]) for a_T in turn_adv], dtype=torch.float32), tokens
