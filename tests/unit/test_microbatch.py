"""Micro-batched steps are the whole-batch step (docs/design.md §15.39 Micro-batches sum to the
whole-batch step): for every loss and normalisation, with the KL term, TIS at both levels and
IcePop, several PPO minibatches and mixed lengths, the losses, gradient norms, metrics and
updated weights are the same whatever ``trainer.micro_batch_tokens`` is, to float32 rounding:
each optimizer step compared from the same state, with tolerances derived from the magnitudes
involved (tests/unit/same_state.py).

AdamW runs with eps = 1e-3 here: its update g / (sqrt(v) + eps) is flat in g except where |g|
is near eps, where the float32 rounding of an accumulated gradient (~1e-8, summed in another
order) moves the update by up to lr / eps times as much; with the default eps 1e-8 that cliff
would make the weights' bound (``same_state.adamw_bound``) too wide to say anything."""
from __future__ import annotations

import copy

import pytest
import torch
from factories import legacy_config
from same_state import StepRecorder, compare_metrics, compare_steps

from rlstream.builtin.tiny_model import build_model
from rlstream.core.config import NORMALIZATIONS, POLICY_LOSSES
from rlstream.trainer.batch import Batch
from rlstream.trainer.micro_batch import MicroMetrics, pack_by_length, padded_tokens
from rlstream.trainer.optimize import make_optimizer, policy_update
from rlstream.trainer.policy_model import token_logprobs

B = 12
BUDGETS = [1, 30]  # 1: every row alone (each is longer than the budget); 30: one to seven rows per forward
NOT_EQUAL_BY_DESIGN = {"train/micro_batches", "perf/padding_share"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py


def mixed_batch(model, seed: int = 0) -> Batch:
    """B right-padded rows of 4..20 tokens: a prompt, then trained targets with holes (a
    multi-turn row), behaviour logprobs off the model's by up to ±0.6 (TIS caps and IcePop bind)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 21, (B,), generator=g)
    lengths[3] = 20  # the longest row is not the first
    N = int(lengths.max())
    tokens = torch.randint(3, 16, (B, N), generator=g)
    attention = (torch.arange(N)[None, :] < lengths[:, None]).long()
    tokens = torch.where(attention.bool(), tokens, torch.zeros_like(tokens))
    with torch.no_grad():
        inf = token_logprobs(model, tokens, attention, 1.0) + (torch.rand(B, N - 1, generator=g) - 0.5) * 1.2
    mask = torch.zeros(B, N - 1)
    for i, n in enumerate(lengths.tolist()):
        start = int(torch.randint(1, n - 1, (1,), generator=g))
        mask[i, start:n - 1] = (torch.rand(n - 1 - start, generator=g) > 0.2).float()
        mask[i, n - 2] = 1.0  # at least one trained target
    return Batch(tokens, attention, inf, mask, torch.randn(B, generator=g))


def train(budget: int | None, steps: int = 2, follow: StepRecorder | None = None, magnitudes: bool = False,
          **overrides) -> tuple[list[dict[str, float]], StepRecorder]:
    """``steps`` policy updates of a fresh tiny model (each on its own batch): their metrics and
    every optimizer step (tests/unit/same_state.py), after each the weights and AdamW state of ``follow``'s."""
    # No clipping: the gradients are compared as accumulated, which is what the derivation in
    # tests/unit/same_state.py bounds (a clip rescales both sides after it, by a coefficient with
    # its own rounding; tests/unit/test_optimize.py covers the clip).
    cfg = legacy_config(prompt_groups_per_step=3, completions_per_prompt=4, learning_rate=1e-2,
                        trainer={"micro_batch_tokens": budget, "eps": 1e-3}, **{"grad_clip_norm": None, **overrides})
    torch.manual_seed(0)
    model = build_model(0)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_beta > 0 else None
    optimizer = make_optimizer(model, cfg)
    recorder = StepRecorder(model, optimizer, follow=follow, magnitudes=magnitudes)
    out = [policy_update(model, optimizer, mixed_batch(model, seed=s), cfg=cfg, lr=cfg.learning_rate, ref_model=ref)
           for s in range(steps)]
    return out, recorder


def assert_same_step(budget: int, **overrides) -> None:
    """Each step in micro-batches is the whole-batch step from the same state: its gradients
    before AdamW, its weights after, its metrics (tests/unit/same_state.py)."""
    whole, whole_steps = train(None, **overrides)
    micro, micro_steps = train(budget, follow=whole_steps, **overrides)
    _, rows = train(1, follow=whole_steps, magnitudes=True, **overrides)
    report: list[tuple[str, float]] = []
    compare_steps(micro_steps, whole_steps, rows, report)
    k = len(whole_steps.steps) // len(whole)  # optimizer steps (minibatches) per update
    for s, (w, m) in enumerate(zip(whole, micro)):
        assert m["train/micro_batches"] > w["train/micro_batches"]  # it did split
        compare_metrics(m, w, rows, slice(s * k, (s + 1) * k), report, ignore=NOT_EQUAL_BY_DESIGN,
                        normalization=overrides.get("normalization", legacy_config().normalization))
    print("largest error / tolerance:", max(report, key=lambda x: x[1]))


@pytest.mark.numeric
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("loss", POLICY_LOSSES)
def test_every_loss_and_normalization_with_kl_and_minibatches(loss, normalization):
    assert_same_step(BUDGETS[1], policy_loss=loss, normalization=normalization, kl_beta=0.05, ppo_n_minibatches=2)


@pytest.mark.numeric
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("tis", [
    {"level": "token", "cap": 1.2},
    {"level": "sequence", "cap": 1.1},
    {"level": "token", "icepop_threshold": 1.4},
    {"level": "sequence", "icepop_threshold": 1.4},
], ids=["token", "sequence", "icepop-token", "icepop-sequence"])
def test_tis_at_both_levels_and_icepop(tis, budget):
    assert_same_step(budget, tis=tis, ppo_n_minibatches=3, normalization="sequence_mean")


@pytest.mark.numeric
@pytest.mark.parametrize("overrides", [
    {"anchor_logp": "rollout"},  # one minibatch, ratio != 1 from the start: the clips act
    {"anchor_logp": "rollout", "policy_loss": "gspo", "gspo_clip": 0.05},
    {"policy_loss": "cispo", "cispo_eps_low": 0.01, "cispo_eps_high": 0.02, "ppo_n_minibatches": 4},
    {"eps_clip_c": 1.5, "policy_loss": "dapo", "ppo_n_minibatches": 6, "kl_beta": 0.1, "kl_estimator": "k1"},
], ids=["rollout-anchor", "gspo-tight-clip", "cispo-tight-clip", "dual-clip-two-row-minibatches"])
def test_clipping_regimes(overrides):
    assert_same_step(37, **overrides)


def test_the_clips_act_in_these_cases():
    # The equalities above are not vacuous: the PPO clip, the TIS cap and IcePop bind on these batches.
    out, _ = train(None, steps=1, anchor_logp="rollout")
    assert 0.0 < out[0]["train/ppo_clip_frac"] < 1.0
    capped, _ = train(None, steps=1, ppo_n_minibatches=3, tis={"cap": 1.2})
    assert 0.0 < capped[0]["train/tis/clip_frac"] < 1.0 and capped[0]["train/ppo_clip_frac"] > 0.0
    icepop, _ = train(None, steps=1, ppo_n_minibatches=3, tis={"cap": 1.2, "icepop_threshold": 1.4})
    assert icepop[0]["train/tis/weight_mean"] < capped[0]["train/tis/weight_mean"]


def test_pack_by_length_longest_first_within_budget():
    lengths = torch.tensor([5, 9, 3, 9, 30, 2, 7])
    micro = pack_by_length(lengths, torch.arange(7), budget=20)
    assert [m.tolist() for m in micro] == [[4], [1, 3], [6, 0], [2, 5]]  # 30 alone (over budget); ties in row order
    assert all(len(m) * int(lengths[m].max()) <= 20 for m in micro[1:])
    assert sorted(torch.cat(micro).tolist()) == list(range(7))
    assert padded_tokens(lengths, micro) == 30 + 18 + 14 + 6
    assert [m.tolist() for m in pack_by_length(lengths, torch.tensor([2, 0]), None)] == [[2, 0]]
    assert [m.tolist() for m in pack_by_length(lengths, torch.tensor([2, 0]), 1)] == [[0], [2]]


def test_padding_share_drops_when_rows_are_packed_by_length():
    whole, _ = train(None, steps=1)
    micro, _ = train(BUDGETS[1], steps=1)
    assert whole[0]["train/micro_batches"] == 1
    assert 0.0 < micro[0]["perf/padding_share"] < whole[0]["perf/padding_share"] < 1.0


def test_micro_metrics_weigh_means_by_active_tokens():
    acc = MicroMetrics()
    acc.add({"active_tokens": 3.0, "ppo_clip_frac": 1.0, "mean_loss": 0.5})
    acc.add({"active_tokens": 1.0, "ppo_clip_frac": 0.0, "mean_loss": 0.25})
    acc.add({"active_tokens": 0.0, "ppo_clip_frac": 0.0, "mean_loss": 0.0})  # an empty micro-batch weighs nothing
    assert acc.result() == {"active_tokens": 4.0, "ppo_clip_frac": 0.75, "mean_loss": 0.75}


@pytest.mark.parametrize(("budget", "advice"), [
    (None, "trainer.micro_batch_tokens unset (one forward of 12 x 20 = 240 padded tokens)"),
    (8, "trainer.micro_batch_tokens = 8; a row longer than the budget trains alone, and this batch has one of 20 "
        "tokens: lower max_seq_len"),
])
def test_a_step_that_does_not_fit_says_what_to_do(monkeypatch, budget, advice):
    from rlstream.core.errors import RlstreamError
    from rlstream.trainer import optimize

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.62 GiB")

    monkeypatch.setattr(optimize, "token_logprobs", out_of_memory)
    with pytest.raises(RlstreamError) as info:
        train(budget, steps=1)
    assert advice in str(info.value)
    assert "Tried to allocate 7.62 GiB" in str(info.value) and "samples stay pending" in str(info.value)


# ----------------------------------------------------------------- logits only where a target is trained
def every_column(batch: Batch, rows: torch.Tensor) -> Batch:
    """The micro-batch as it was before docs/design.md §15.97 Logits only where a target is trained:
    every target column, the logits of every position."""
    N = int(batch.attention_B_N[rows].sum(-1).max())
    adv_B_T = None if batch.advantages_B_T is None else batch.advantages_B_T[rows, :N - 1]
    return Batch(batch.tokens_B_N[rows, :N], batch.attention_B_N[rows, :N], batch.inf_logprobs_B_T[rows, :N - 1],
                 batch.mask_B_T[rows, :N - 1], batch.advantages_B[rows], adv_B_T)


@pytest.mark.numeric
@pytest.mark.parametrize("budget", [None, 1, 30])
@pytest.mark.parametrize("overrides", [
    {"policy_loss": "grpo", "kl_beta": 0.05, "ppo_n_minibatches": 2},
    {"policy_loss": "gspo", "normalization": "sequence_mean", "anchor_logp": "rollout", "tis": {"cap": 1.2}},
], ids=["grpo-kl-minibatches", "gspo-rollout-tis"])
def test_the_step_on_the_trained_targets_logits_is_the_step_on_every_positions(monkeypatch, budget, overrides):
    # The prompts' columns left out of each micro-batch (with the head applied to the rest only) change no
    # gradient, weight or metric: the same steps as with the logits of every position, to float32 rounding.
    from rlstream.trainer import micro_batch

    overrides = {"ppo_n_minibatches": 1, **overrides}
    cut, cut_steps = train(budget, **overrides)
    with monkeypatch.context() as m:
        m.setattr(micro_batch, "rows_of", every_column)
        whole, whole_steps = train(budget, follow=cut_steps, **overrides)
        _, rows = train(1, follow=cut_steps, magnitudes=True, **overrides)
    report: list[tuple[str, float]] = []
    compare_steps(whole_steps, cut_steps, rows, report)
    k = len(cut_steps.steps) // len(cut)
    for s, (w, c) in enumerate(zip(whole, cut)):
        compare_metrics(w, c, rows, slice(s * k, (s + 1) * k), report,
                        normalization=overrides.get("normalization", legacy_config().normalization))
    print("largest error / tolerance:", max(report, key=lambda x: x[1]))


def prompted_batch(B: int = 6, prompt: int = 10, completion: int = 3) -> Batch:
    g = torch.Generator().manual_seed(3)
    N = prompt + completion
    tokens = torch.randint(3, 16, (B, N), generator=g)
    mask = torch.zeros(B, N - 1)
    mask[:, prompt - 1:] = 1.0  # the completion's targets
    mask[0, prompt - 3] = 1.0  # one row's trained target starts earlier (a multi-turn row's earlier turn)
    return Batch(tokens, torch.ones_like(tokens), torch.full((B, N - 1), -2.0), mask, torch.randn(B, generator=g))


def test_the_output_head_sees_only_the_positions_from_the_first_trained_target():
    cfg = legacy_config(prompt_groups_per_step=2, completions_per_prompt=3, ppo_n_minibatches=2, kl_beta=0.05)
    model = build_model(0)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    seen: list[int] = []
    for m in (model, ref):
        m.lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    policy_update(model, make_optimizer(model, cfg), prompted_batch(), cfg=cfg, lr=1e-3, ref_model=ref)
    # 13 tokens. Minibatch 1 (rows 0-2): the earliest trained target is row 0's token 8, predicted at position
    # 7: positions 7..12 (the last one's logits predict nothing). Minibatch 2 (rows 3-5): token 10, positions
    # 9..12. The old policy's forwards, the reference's, then the two minibatches' steps.
    assert seen == [6, 4] * 3


@pytest.mark.numeric
def test_a_model_without_logits_to_keep_has_its_logits_cut_alike():
    from rlstream.trainer.policy_model import keeps_logits

    class Plain(torch.nn.Module):  # a causal LM whose forward takes no logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = build_model(0)

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    plain, batch = Plain(), prompted_batch()
    assert keeps_logits(plain.inner) and not keeps_logits(plain)
    with torch.no_grad():
        every = token_logprobs(plain.inner, batch.tokens_B_N, batch.attention_B_N, 0.7)
        kept = token_logprobs(plain.inner, batch.tokens_B_N, batch.attention_B_N, 0.7, first=7)
        sliced = token_logprobs(plain, batch.tokens_B_N, batch.attention_B_N, 0.7, first=7)
    assert kept.shape == sliced.shape == (6, 5)
    torch.testing.assert_close(kept, every[:, 7:], rtol=0, atol=1e-5)
    torch.testing.assert_close(sliced, every[:, 7:], rtol=0, atol=0)
