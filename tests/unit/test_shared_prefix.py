"""A micro-batch's shared prompts computed once (``trainer.shared_prefix``; docs/design.md §15.100
A group's prompt is computed once): the same logprobs, gradients and optimizer steps as the plain
forward, to float rounding (steps compared from the same state, tests/unit/same_state.py), with
the prefix's forward counted to show that it ran; and the plain forward wherever sharing would
not save work or cannot run."""
from __future__ import annotations

import copy

import pytest
import torch
from factories import legacy_config
from same_state import StepRecorder, compare_metrics, compare_steps

from rlstream.builtin.tiny_model import build_model
from rlstream.core.config import POLICY_LOSSES
from rlstream.sampling.prefix_cache import cache_argument, keys_and_values_only
from rlstream.trainer import lora
from rlstream.trainer.batch import Batch
from rlstream.trainer.micro_batch import rows_of
from rlstream.trainer.optimize import make_optimizer, micro_loss, policy_update
from rlstream.trainer.policy_model import token_logprobs
from rlstream.trainer.precision import Precision, enable_checkpointing
from rlstream.trainer.ranks import Ranks

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py

G = 4  # completions per prompt


def grouped_rows(seed: int = 0, groups: int = 3, one_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (groups x G, N) tokens and attention: each group's G rows share a prompt of 3..6
    tokens (the prompts' lengths differ, so a prefix of the shortest cuts into the others), then
    completions of 1..5 tokens; with ``one_token`` (the built-in task's shape), prompts of 4 tokens
    and completions of one. The last group's prompt ends in the pad id 0 as a real token."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(groups):
        prompt = torch.randint(3, 16, (4 if one_token else 3 + k % 4,), generator=g).tolist()
        if k == groups - 1:
            prompt[-1] = 0
        for _ in range(G):
            n = 1 if one_token else int(torch.randint(1, 6, (1,), generator=g))
            rows.append(prompt + torch.randint(3, 16, (n,), generator=g).tolist())
    N = max(map(len, rows))
    tokens = torch.tensor([r + [0] * (N - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (N - len(r)) for r in rows])
    return tokens, attention


class Forwards:
    """The row counts of ``model``'s forwards (a pre-hook on the top module)."""

    def __init__(self, model: torch.nn.Module):
        self.rows: list[int] = []
        model.register_forward_pre_hook(lambda m, args, kwargs: self.rows.append(kwargs["input_ids"].shape[0]),
                                        with_kwargs=True)


def logprobs_and_gradient(model, tokens, attention, first, shared, temperature=0.7):
    model.zero_grad(set_to_none=True)
    lp_B_T = token_logprobs(model, tokens, attention, temperature, first, shared_prefix=shared)
    real_B_T = attention[:, first + 1:].bool()  # padding's logprobs are never read
    (lp_B_T * real_B_T).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return torch.where(real_B_T, lp_B_T.detach(), 0.0), grads


@pytest.mark.numeric
@pytest.mark.parametrize("one_token", [False, True])
def test_the_same_logprobs_and_gradient_with_the_prefix_computed_once(one_token):
    torch.manual_seed(0)
    model = build_model(0)
    tokens, attention = grouped_rows(one_token=one_token)
    first = 3 if one_token else 2  # the shortest prompt's last position: its logits score the first trained token
    plain_lp, plain_grads = logprobs_and_gradient(model, tokens, attention, first, shared=False)
    seen = Forwards(model)
    shared_lp, shared_grads = logprobs_and_gradient(model, tokens, attention, first, shared=True)
    # one forward of the 3 distinct prefixes, then (with completions past the prefix) one of every row's rest
    assert seen.rows == ([3] if one_token else [3, len(tokens)])
    torch.testing.assert_close(shared_lp, plain_lp, rtol=1e-5, atol=1e-5)
    scale = max(float(g.abs().max()) for g in plain_grads)
    for shared_g, plain_g in zip(shared_grads, plain_grads):
        torch.testing.assert_close(shared_g, plain_g, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.numeric
@pytest.mark.parametrize("padded_first", [False, True])
def test_a_real_pad_token_never_shares_with_padding(padded_first):
    """Rows whose prefixes hold the same token ids, the pad id 0 included, but where one is a real
    token and the other padding (a row shorter than the prefix, with no trained target): two
    prefixes, not one, whichever ``torch.unique`` puts first. Sharing the padded prefix would mask
    the real 0 out of the real rows' attention."""
    model = build_model(0)
    real = [[5, 0, 0, 8], [5, 0, 0, 9]]
    padded = [[5, 0, 0, 0], [5, 0, 0, 0]]
    tokens = torch.tensor(padded + real if padded_first else real + padded)
    attention = torch.tensor([[1, 1, 0, 0]] * 2 + [[1] * 4] * 2 if padded_first else [[1] * 4] * 2 + [[1, 1, 0, 0]] * 2)
    rows = slice(2, 4) if padded_first else slice(0, 2)
    seen = Forwards(model)
    with torch.no_grad():
        shared = token_logprobs(model, tokens, attention, 1.0, 2, shared_prefix=True)
        plain = token_logprobs(model, tokens, attention, 1.0, 2)
    assert seen.rows == [2, 4]  # the prefixes [5 0 0] (real) and [5 0 pad]: 2 rows each
    torch.testing.assert_close(shared[rows], plain[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["distinct prompts", "no prefix", "gradient checkpointing", "plain module",
                                  "recurrent cache", "dynamic rope"])
def test_the_plain_forward_where_sharing_would_not_save_work_or_cannot_run(case):
    model = build_model(0)
    tokens, attention = grouped_rows()
    first = 2
    if case == "distinct prompts":  # fewer than two rows a prefix: sharing would add a forward
        tokens[:, 0] = torch.arange(len(tokens)) % 16
    elif case == "no prefix":
        first = 0
    elif case == "recurrent cache":  # Mamba's cache holds states, and its forward reads its mask as the new tokens'
        from transformers import AutoModelForCausalLM, MambaConfig

        model = AutoModelForCausalLM.from_config(MambaConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1,
                                                             state_size=4, use_mambapy=True))
        assert cache_argument(model) is None
    elif case == "dynamic rope":  # frequencies from the forward's own length: a prefix's keys would rotate otherwise
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(model.config)
        config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0,
                                  "rope_theta": config.rope_parameters["rope_theta"]}
        model = AutoModelForCausalLM.from_config(config)
        assert cache_argument(model) is None
    elif case == "gradient checkpointing":  # transformers keeps no cache for checkpointed layers
        enable_checkpointing(model)
        model.train()
    else:
        inner = model

        class Plain(torch.nn.Module):  # no config, no cache argument
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                return inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

        model = Plain()
        assert cache_argument(model) is None
    seen = Forwards(model)
    token_logprobs(model, tokens, attention, 1.0, first, shared_prefix=True)
    assert seen.rows == [len(tokens)]


def test_a_cache_transformers_cannot_build_for_the_config_is_no_cache_to_share():
    """A layer type the installed transformers builds no dynamic cache layer for (as DeepSeek-V4's
    "heavily_compressed_attention" on 5.25, a KeyError there): the plain forward, not an error
    from every shared forward and every local sampler's draw."""
    config = copy.deepcopy(build_model(0).config)
    config.layer_types = ["a_layer_type_transformers_does_not_know"] * config.num_hidden_layers
    assert keys_and_values_only(config) is False


@pytest.mark.numeric
def test_a_lora_policy_shares_its_prefix_through_peft():
    cfg = legacy_config(prompt_groups_per_step=1, completions_per_prompt=2, lora_rank=4)
    model = lora.wrap(build_model(0), cfg)
    with torch.no_grad():  # adapters away from zero, so that they take part
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    tokens, attention = grouped_rows()
    plain_lp, plain_grads = logprobs_and_gradient(model, tokens, attention, 2, shared=False)
    seen = Forwards(model.get_base_model())
    shared_lp, shared_grads = logprobs_and_gradient(model, tokens, attention, 2, shared=True)
    assert seen.rows == [3, len(tokens)]
    torch.testing.assert_close(shared_lp, plain_lp, rtol=1e-5, atol=1e-5)
    scale = max(float(g.abs().max()) for g in plain_grads)
    for shared_g, plain_g in zip(shared_grads, plain_grads):
        torch.testing.assert_close(shared_g, plain_g, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.numeric
def test_the_lora_reference_shares_its_prefix_with_its_adapters_disabled():
    """The KL reference of a LoRA run (``lora.AdapterDisabled``: the policy's base, no config of
    its own) shares its prefixes like the policy, and gives the base's logprobs."""
    cfg = legacy_config(prompt_groups_per_step=1, completions_per_prompt=2, lora_rank=4)
    base = build_model(0)
    policy = lora.wrap(copy.deepcopy(base), cfg)
    with torch.no_grad():  # adapters away from zero: the reference must leave them out
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    reference = lora.AdapterDisabled(policy)
    tokens, attention = grouped_rows()
    seen = Forwards(policy.get_base_model())
    with torch.no_grad():
        shared = token_logprobs(reference, tokens, attention, 0.7, 2, shared_prefix=True)
        plain = token_logprobs(base, tokens, attention, 0.7, 2)
    assert seen.rows == [3, len(tokens)]
    real = attention[:, 3:].bool()
    torch.testing.assert_close(shared[real], plain[real], rtol=1e-5, atol=1e-5)


def grouped_batch(model, seed: int) -> Batch:
    """``grouped_rows`` as a training batch: every completion token trained, behaviour logprobs
    off the model's by up to ±0.6 (TIS and the clips bind), group-normalised-like advantages."""
    g = torch.Generator().manual_seed(seed)
    tokens, attention = grouped_rows(seed, groups=4)
    B, N = tokens.shape
    with torch.no_grad():
        inf = token_logprobs(model, tokens, attention, 1.0) + (torch.rand(B, N - 1, generator=g) - 0.5) * 1.2
    mask = torch.zeros(B, N - 1)
    for i in range(B):
        prompt = 3 + (i // G) % 4
        mask[i, prompt - 1:int(attention[i].sum()) - 1] = 1.0
    return Batch(tokens, attention, inf * mask, mask, torch.randn(B, generator=g))


@pytest.mark.parametrize("world", [1, 2])
def test_several_trainer_ranks_take_the_plain_forward(world):
    """Across ranks each rank would choose one forward or two from its own rows, and FSDP's ranks
    must run the same forwards (each gathers the weights, a collective): the plain one there."""
    cfg = legacy_config(prompt_groups_per_step=4, completions_per_prompt=G, trainer={"shared_prefix": True})
    model = build_model(0)
    batch = grouped_batch(model, 0)
    mb = rows_of(batch, torch.arange(len(batch.advantages_B)))  # first = 2: the shortest prompt's last token
    seen = Forwards(model)
    micro_loss(model, mb, None, None, cfg=cfg, precision=Precision(), denominator=1.0, grad=True,
               ranks=Ranks(0, world))
    assert seen.rows == ([len(mb.tokens_B_N)] if world > 1 else [4, len(mb.tokens_B_N)])


def train(shared: bool, budget: int | None, follow: StepRecorder | None = None, magnitudes: bool = False,
          **overrides) -> tuple[list[dict[str, float]], StepRecorder]:
    """Two policy updates of a fresh tiny model on grouped batches (no clipping: the gradients
    are compared as accumulated, tests/unit/same_state.py)."""
    cfg = legacy_config(prompt_groups_per_step=4, completions_per_prompt=G, learning_rate=1e-2,
                        trainer={"micro_batch_tokens": budget, "eps": 1e-3, "shared_prefix": shared},
                        **{"grad_clip_norm": None, **overrides})
    torch.manual_seed(0)
    model = build_model(0)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_beta > 0 else None
    optimizer = make_optimizer(model, cfg)
    recorder = StepRecorder(model, optimizer, follow=follow, magnitudes=magnitudes)
    out = [policy_update(model, optimizer, grouped_batch(model, s), cfg=cfg, lr=cfg.learning_rate, ref_model=ref)
           for s in range(2)]
    return out, recorder


@pytest.mark.numeric
@pytest.mark.parametrize("budget", [None, 40])
@pytest.mark.parametrize("loss", POLICY_LOSSES)
def test_every_loss_takes_the_same_step_with_kl_and_minibatches(loss, budget):
    """The step with the prefixes shared is the plain step from the same state (the old policy's
    and the reference's forwards shared too), whole or in micro-batches."""
    overrides = dict(policy_loss=loss, kl_beta=0.05, ppo_n_minibatches=2)
    plain, plain_steps = train(False, budget, **overrides)
    shared, shared_steps = train(True, budget, follow=plain_steps, **overrides)
    _, rows = train(False, 1, follow=plain_steps, magnitudes=True, **overrides)
    report: list[tuple[str, float]] = []
    compare_steps(shared_steps, plain_steps, rows, report)
    k = len(plain_steps.steps) // len(plain)
    for s, (p, m) in enumerate(zip(plain, shared)):
        compare_metrics(m, p, rows, slice(s * k, (s + 1) * k), report)
    print("largest error / tolerance:", max(report, key=lambda x: x[1]))


@pytest.mark.numeric
def test_bfloat16_autocast_shares_its_prefix_alike():
    """Under the trainer's bfloat16 autocast (``trainer.dtype``) the cache is bfloat16: the shared
    forward's logprobs are the plain one's to bfloat16 rounding."""
    model = build_model(0)
    tokens, attention = grouped_rows()
    seen = Forwards(model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        shared = token_logprobs(model, tokens, attention, 1.0, 2, shared_prefix=True)
        plain = token_logprobs(model, tokens, attention, 1.0, 2)
    assert seen.rows == [3, len(tokens), len(tokens)]
    real = attention[:, 3:].bool()
    torch.testing.assert_close(shared[real], plain[real], rtol=0, atol=0.05)
