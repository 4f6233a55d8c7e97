"""The PPO inner loop and the reference model, on the tiny model (no Redis)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from factories import legacy_config
from torch.overrides import TorchFunctionMode

from rlstream.builtin.tiny_model import build_model
from rlstream.core.config import POLICY_LOSSES, Config
from rlstream.trainer.advantages import resolve_advantage
from rlstream.trainer.batch import Batch
from rlstream.trainer.losses import LossConfig, compute_loss, loss_denominator
from rlstream.trainer.optimize import clip_and_step, make_optimizer, minibatch_indices, policy_update
from rlstream.trainer.policy_model import token_logprobs


def make_batch(model, B: int = 16, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randint(3, 13, (B,), generator=g), torch.randint(3, 13, (B,), generator=g)
    answer = torch.randint(3, 13, (B,), generator=g)
    tokens = torch.stack([a, torch.full((B,), 13), b, torch.full((B,), 14), answer], dim=1)
    attention = torch.ones_like(tokens)
    with torch.no_grad():
        inf = token_logprobs(model, tokens, attention, 1.0)
    mask = torch.zeros_like(inf)
    mask[:, -1] = 1.0  # only the answer token is trained
    advantages = torch.tensor([1.0, -1.0] * (B // 2))
    return Batch(tokens, attention, inf, mask, advantages)


def cfg(**overrides) -> Config:
    return legacy_config(prompt_groups_per_step=2, completions_per_prompt=8, **overrides)


def test_minibatches_make_the_clip_act():
    torch.manual_seed(0)
    model = build_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    single = policy_update(model, opt, make_batch(model), cfg=cfg(), lr=0.05)
    assert single["train/ppo_clip_frac"] == 0.0 and single["train/ppo_ratio_mean"] == pytest.approx(1.0)
    multi = policy_update(model, opt, make_batch(model, seed=1), cfg=cfg(ppo_n_minibatches=4), lr=0.05)
    assert multi["train/minibatches"] == 4
    assert multi["train/ppo_clip_frac"] > 0.0


def test_reference_kl_starts_at_zero_and_rises():
    import copy

    torch.manual_seed(0)
    model = build_model(0)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    c = cfg(kl_beta=0.1)
    kls = [policy_update(model, opt, make_batch(model, seed=i), cfg=c, lr=0.01, ref_model=ref)["train/ref_kl"]
           for i in range(5)]
    assert kls[0] == pytest.approx(0.0, abs=1e-7)
    assert kls[-1] > 1e-4 and kls[-1] > kls[1]


def test_rollout_anchor_has_unit_tis_weight():
    torch.manual_seed(0)
    model = build_model(0)
    batch = make_batch(model)
    batch.inf_logprobs_B_T[:, -1] -= 0.5  # a stale sampler: old - inf = 0.5 under old_policy
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    stale = policy_update(model, opt, batch, cfg=cfg(), lr=1e-3)
    assert stale["train/tis/weight_mean"] == pytest.approx(torch.exp(torch.tensor(0.5)).item(), rel=1e-3)
    rollout = policy_update(model, opt, batch, cfg=cfg(anchor_logp="rollout"), lr=1e-3)
    assert rollout["train/tis/weight_mean"] == pytest.approx(1.0)


def test_update_changes_weights_towards_positive_advantage():
    torch.manual_seed(0)
    model = build_model(0)
    batch = make_batch(model)
    before = token_logprobs(model, batch.tokens_B_N, batch.attention_B_N, 1.0)[:, -1].detach()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    policy_update(model, opt, batch, cfg=cfg(), lr=1e-2)
    after = token_logprobs(model, batch.tokens_B_N, batch.attention_B_N, 1.0)[:, -1].detach()
    delta = after - before
    assert delta[batch.advantages_B > 0].mean() > delta[batch.advantages_B < 0].mean()


def test_resolve_advantage_builtin_and_user_function():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(resolve_advantage("dr_grpo")(rewards), torch.tensor([0.5, -0.5, -0.5, 0.5]))
    user = resolve_advantage("torch:neg")
    assert torch.equal(user(rewards), -rewards)
    with pytest.raises(ValueError, match="cannot import module"):
        resolve_advantage("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="must look like"):
        resolve_advantage("not a spec")


class TableLM(torch.nn.Module):
    """A bigram LM whose logits are a learnable V x V table: gradients by hand.
    Tokens [0, 1] with a zero table: log pi(1 | 0) = log 1/2, d lp / d table[0] = e_1 - p
    = [-0.5, +0.5]; table[1] gets no gradient (its logits predict past the end)."""

    def __init__(self, V: int = 2):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(V, V))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def table_batch(advantages: list[float]) -> Batch:
    B = len(advantages)
    tokens = torch.tensor([[0, 1]] * B)
    inf = torch.full((B, 1), -0.6931471805599453)  # log 1/2: the sampler is the same policy
    return Batch(tokens, torch.ones_like(tokens), inf, torch.ones(B, 1), torch.tensor(advantages))


def test_minibatch_indices_never_empty():
    assert [t.tolist() for t in minibatch_indices(2, 4)] == [[0], [1]]
    assert [t.tolist() for t in minibatch_indices(1, 4)] == [[0]]
    assert [t.tolist() for t in minibatch_indices(5, 2)] == [[0, 1, 2], [3, 4]]


def test_fewer_samples_than_minibatches_averages_over_the_slices_used():
    # B = 2 < K = 4 -> k = 2 slices of one sample. lr = 0 keeps the weights, so each slice has
    # r = 1 and d loss/d lp = -A: loss -1 and -3 -> mean over k=2 is -2 (over K=4 it would be -1).
    # grad norm = |A|·|[0.5, -0.5]| = 0.7071068, 2.1213203 -> mean 1.4142136.
    model = TableLM()
    out = policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), table_batch([1.0, 3.0]),
                        cfg=cfg(ppo_n_minibatches=4), lr=0.0)
    assert out["train/minibatches"] == 2
    assert out["train/loss"] == pytest.approx(-2.0)
    assert out["train/grad_norm"] == pytest.approx(1.4142136)
    assert out["train/active_tokens"] == 2.0  # summed over the slices
    assert out["train/ppo_ratio_mean"] == pytest.approx(1.0)


def test_fewer_samples_than_minibatches_on_the_tiny_model():
    # The crash case: the final partial batch (2 samples) with K = 4 ran a forward on empty slices.
    torch.manual_seed(0)
    model = build_model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = policy_update(model, opt, make_batch(model, B=2), cfg=cfg(ppo_n_minibatches=4), lr=1e-3)
    assert out["train/minibatches"] == 2 and out["train/active_tokens"] == 2.0


@pytest.mark.parametrize(("clip", "grad_norm", "table0"), [
    # Gradient of the loss -r·A (A = 1, N = 1) w.r.t. table[0]: -(e_1 - p) = [0.5, -0.5],
    # norm sqrt(0.5) = 0.7071068 (reported before clipping). SGD, lr = 1:
    # clip 0.1 -> scale 0.1/(0.7071068 + 1e-6) -> table[0] = -[0.5, -0.5]·0.1414213 = ∓0.0707106
    (0.1, 0.7071068, [-0.0707106, 0.0707106]),
    # no clip (unset, or the cookbook's 0.0) -> the full step
    (None, 0.7071068, [-0.5, 0.5]),
    (0.0, 0.7071068, [-0.5, 0.5]),
])
def test_grad_clip_norm_clips_the_step(clip, grad_norm, table0):
    model = TableLM()
    out = policy_update(model, torch.optim.SGD(model.parameters(), lr=1.0), table_batch([1.0]),
                        cfg=cfg(grad_clip_norm=clip), lr=1.0)
    assert out["train/grad_norm"] == pytest.approx(grad_norm)
    assert model.table.detach().tolist() == [pytest.approx(table0, abs=1e-6), [0.0, 0.0]]


def test_make_optimizer_hyperparameters():
    model = build_model(0)
    opt = make_optimizer(model, cfg(learning_rate=3e-4))
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["weight_decay"] == 0.01 and group["eps"] == 1e-8
    assert group["lr"] == 3e-4
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}
    assert group["fused"] is True  # the CPU has the fused kernel (as CUDA does)
    with torch.device("meta"):  # a device without it: torch's default instead of an error
        elsewhere = make_optimizer(build_model(0), cfg())
    assert not elsewhere.param_groups[0]["fused"]


def test_dropout_model_gives_unit_ratio_and_zero_ref_kl_before_any_update():
    # A model with dropout, kept in train() as the trainer does: with lr = 0 the weights never
    # move, so over K = 2 minibatches the ratio must stay exactly 1 (no clip), the TIS weight
    # against eval-mode behaviour logprobs exactly 1, and the KL to the eval-mode reference 0.
    import copy

    from transformers import AutoModelForCausalLM

    config = build_model(0).config
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    batch = make_batch(model.eval())
    model.train()
    out = policy_update(model, torch.optim.SGD(model.parameters(), lr=0.0), batch,
                        cfg=cfg(ppo_n_minibatches=2, kl_beta=0.1), lr=0.0, ref_model=ref)
    assert out["train/ppo_ratio_mean"] == 1.0 and out["train/ppo_clip_frac"] == 0.0
    assert out["train/tis/weight_mean"] == 1.0 and out["train/ref_kl"] == 0.0


class HostReads(TorchFunctionMode):
    """Counts the tensor values read back to Python (``item``, ``tolist``, ``float()``, ``int()``,
    ``bool()``): on CUDA each one waits for the device's queue to drain (a sync), so the update
    reads as few as it can (docs/design.md §15.93 The update reads the device back once per micro-batch).
    On CPU the count is the same, which is what these tests pin."""

    READS = frozenset({torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
                       torch.Tensor.__bool__})

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func in self.READS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("policy", POLICY_LOSSES)
def test_the_loss_reads_its_metrics_back_at_once(policy):
    # One read for the loss value and every metric (with the reference KL too), where a float() per metric made
    # ~10 device syncs a micro-batch; the minibatch's denominator, given, costs none.
    batch = make_batch(build_model(0))
    lp = batch.inf_logprobs_B_T.clone().requires_grad_()
    with HostReads() as host:
        loss, metrics = compute_loss(policy, lp, lp.detach(), batch.inf_logprobs_B_T, batch.advantages_B,
                                     batch.mask_B_T, ref_logprobs=batch.inf_logprobs_B_T - 0.1,
                                     config=LossConfig(kl_beta=0.1), denominator=16.0)
    assert host.reads == 1
    assert metrics["mean_loss"] == float(loss) and metrics["active_tokens"] == 16.0
    assert metrics["ref_kl"] > 0 and metrics["mean_kl"] == pytest.approx(0.1)
    assert list(metrics)[:7] == ["ppo_clip_frac", "ppo_ratio_mean", "ppo_kl", "ppo_log_ratio_mean", "ref_kl",
                                 "tis/weight_mean", "tis/clip_frac"]
    with HostReads() as host:
        assert loss_denominator(batch.mask_B_T, "sequence_mean") == 16.0
    assert host.reads == 1


def test_clip_and_step_reads_the_norm_once():
    model = build_model(0)
    batch = make_batch(model)
    token_logprobs(model, batch.tokens_B_N, batch.attention_B_N, 1.0)[batch.mask_B_T.bool()].sum().backward()
    with HostReads() as host:
        norm, applied = clip_and_step(model, torch.optim.SGD(model.parameters(), lr=0.1), True, 1.0)
    assert host.reads == 1 and applied and norm > 0
