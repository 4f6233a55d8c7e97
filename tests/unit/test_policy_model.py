"""The trainer's model side: dropout-free logprobs, worker/trainer logprob agreement, the
frozen reference model, the one model-directory writer. Tiny model, CPU, no Redis."""
from __future__ import annotations

import pytest
import torch
from factories import legacy_config

from rlstream.builtin.tiny_model import build_model, build_tokenizer, save_tiny_model
from rlstream.core import weights
from rlstream.core.config import Config
from rlstream.core.errors import ConfigError
from rlstream.core.messages import RolloutRecord
from rlstream.sampling.torch_setup import load_model_and_tokenizer
from rlstream.trainer.batch import collate
from rlstream.trainer.policy_model import load_reference, token_logprobs, weights_dir, write_weights

CPU = torch.device("cpu")
# Two "a+b=c<eos>" rows in the tiny vocabulary, every token real (no padding).
TOKENS = torch.tensor([[3, 13, 4, 14, 7, 1], [5, 13, 9, 14, 8, 1]])


def dropout_model():
    """The tiny Qwen2 with attention dropout 0.5 (GPT-2 style models ship with dropout on)."""
    from transformers import AutoModelForCausalLM

    config = build_model(0).config
    config.attention_dropout = 0.5
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def test_dropout_model_is_random_in_train_mode():
    # Guard for the next test: the raw forward of this model really is noisy in train mode.
    model = dropout_model()
    a, b = (model(input_ids=TOKENS).logits for _ in range(2))
    assert not torch.equal(a, b)


def test_token_logprobs_runs_without_dropout_and_keeps_gradients():
    model = dropout_model()
    first = token_logprobs(model, TOKENS, torch.ones_like(TOKENS), 1.0)
    second = token_logprobs(model, TOKENS, torch.ones_like(TOKENS), 1.0)
    assert torch.equal(first, second)  # same weights, same logprobs: ratio is exactly 1
    assert model.training  # the caller's mode is restored
    first.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # ... and they are the logprobs of the eval-mode policy the workers sample from.
    with torch.no_grad():
        logits = model.eval()(input_ids=TOKENS).logits[:, :-1]
    expected = torch.log_softmax(logits, -1).gather(-1, TOKENS[:, 1:, None])[..., 0]
    assert torch.equal(first.detach(), expected)


def test_token_logprobs_restores_eval_mode_too():
    model = dropout_model().eval()
    token_logprobs(model, TOKENS, torch.ones_like(TOKENS), 1.0)
    assert not model.training


def test_a_model_in_eval_mode_is_not_switched(monkeypatch):
    """The trainer keeps its policy in eval mode: a forward then walks no module to switch it
    (``train()``/``eval()`` cost ~0.15 ms each on the tiny model), and gives the same logprobs."""
    model = dropout_model()
    expected = token_logprobs(model, TOKENS, torch.ones_like(TOKENS), 1.0)  # switched to eval and back
    model.eval()
    switches = []
    monkeypatch.setattr(type(model), "train", lambda self, mode=True: switches.append(mode) or self)
    assert torch.equal(token_logprobs(model, TOKENS, torch.ones_like(TOKENS), 1.0), expected)
    assert switches == [] and not model.training


def test_scoring_builds_no_kv_cache_yet_takes_a_model_without_the_setting():
    """docs/design.md §15.92 Scoring forwards build no KV cache: a Hugging Face model is asked for none (the
    same logprobs as with its default cache); a plain module, whose forward has no such keyword, is
    called as before."""
    model = build_model(0).eval()
    tokens_B_N = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 2]])
    attention_B_N = torch.ones_like(tokens_B_N)
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("use_cache")), with_kwargs=True)
    with torch.no_grad():
        got_B_T = token_logprobs(model, tokens_B_N, attention_B_N, 1.0)
        logits = model(input_ids=tokens_B_N, attention_mask=attention_B_N).logits[:, :-1].float()
    want_B_T = torch.log_softmax(logits, -1).gather(-1, tokens_B_N[:, 1:, None])[..., 0]
    assert calls == [False, None] and torch.equal(got_B_T, want_B_T)

    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(16, 16)

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.emb(input_ids)})()

    assert token_logprobs(Plain().eval(), tokens_B_N, attention_B_N, 1.0).shape == (2, 3)


def test_the_trainers_policy_stays_in_eval_mode(tmp_path):
    import fakeredis

    from rlstream.trainer.trainer import Trainer

    t = Trainer(Config(run_id="eval-mode", log_path=str(tmp_path)), fakeredis.FakeRedis(), tmp_path / "eval-mode")
    assert not t.model.training and not any(m.training for m in t.model.modules())


def test_trainer_logprobs_match_worker_behaviour_logprobs_at_temperature(tmp_path):
    from rlstream.sampling.local import LocalPolicy

    model, tokenizer = load_model_and_tokenizer(str(save_tiny_model(tmp_path / "tiny", seed=0)), CPU)
    model.train()  # as in the trainer: the worker samples in eval mode whatever the owner's mode
    policy = LocalPolicy.from_model(model, tokenizer, CPU, version=0)
    torch.manual_seed(0)
    # Prompts of different lengths: left-padded when sampling, right-padded by collate.
    prompts = [tokenizer("3+4=")["input_ids"], tokenizer("12+9=")["input_ids"], tokenizer("7=")["input_ids"]]
    completions = policy.generate(prompts, max_tokens=6, temperature=0.7)
    samples = [RolloutRecord(tokens=c.full_tokens, logprobs=[0.0] * c.prompt_len + c.inference_logprobs,
                             loss_mask=[0] * c.prompt_len + [1] * len(c.output_tokens), reward=0.0)
               for c in completions]
    assert len({len(s.tokens) for s in samples}) > 1  # padding is exercised
    batch = collate(samples, torch.zeros(len(samples)), tokenizer.pad_token_id, CPU)
    with torch.no_grad():
        trainer_B_T = token_logprobs(model, batch.tokens_B_N, batch.attention_B_N, 0.7)
    active = batch.mask_B_T.bool()
    assert int(active.sum()) == sum(len(c.output_tokens) for c in completions)
    torch.testing.assert_close(trainer_B_T[active], batch.inf_logprobs_B_T[active], atol=1e-5, rtol=0)
    # At temperature 1 the trainer's logprobs would differ: the temperature is really applied.
    with torch.no_grad():
        at_one_B_T = token_logprobs(model, batch.tokens_B_N, batch.attention_B_N, 1.0)
    assert (at_one_B_T[active] - batch.inf_logprobs_B_T[active]).abs().max() > 1e-3


def ref_cfg(**overrides) -> Config:
    return legacy_config(prompt_groups_per_step=2, completions_per_prompt=8, kl_beta=0.1, **overrides)


def test_reference_copy_is_frozen_eval_and_separate():
    model = build_model(0).train()
    ref = load_reference(ref_cfg(), model, build_tokenizer(), CPU)
    assert ref is not model and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    # The policy itself is untouched: still training, still trainable.
    assert model.training and all(p.requires_grad for p in model.parameters())
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


def test_reference_model_dir_is_frozen_eval(tmp_path):
    path = save_tiny_model(tmp_path / "ref", seed=1)
    ref = load_reference(ref_cfg(reference_model=str(path)), build_model(0), build_tokenizer(), CPU)
    assert not ref.training and all(not p.requires_grad for p in ref.parameters())


def test_reference_model_with_another_tokenizer_is_a_config_error(tmp_path):
    path = tmp_path / "ref"
    build_model(1).save_pretrained(path)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<extra>"])  # one token more than the policy's vocabulary
    tokenizer.save_pretrained(path)
    with pytest.raises(ConfigError, match=r"reference_model .* has a different tokenizer than the policy"):
        load_reference(ref_cfg(reference_model=str(path)), build_model(0), build_tokenizer(), CPU)


def test_write_model_dir_seals_model_tokenizer_and_extra_files(tmp_path):
    final = tmp_path / "models" / "out"
    digest, size = weights.write_model_dir(final, build_model(0), build_tokenizer(), version=-1,
                                   extra_files=lambda tmp: (tmp / "extra.json").write_text("{}"))
    weights.verify(final, digest)  # complete and matching its manifest
    assert (final / "extra.json").is_file() and (final / "config.json").is_file() and size > 0
    assert not list(final.parent.glob(".tmp-*"))
    load_model_and_tokenizer(str(final), CPU)  # a standalone HF directory


def test_write_weights_announces_the_version_and_prunes_all_but_v0_and_the_newest(tmp_path):
    model, tokenizer = build_model(0), build_tokenizer()
    for version in range(4):
        published = write_weights(model, tokenizer, tmp_path, version, keep=2)
    assert published.version == 3 and published.uri == str(weights_dir(tmp_path, 3).resolve())
    weights.verify(weights_dir(tmp_path, 3), published.sha256)
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["v0", "v2", "v3"]
