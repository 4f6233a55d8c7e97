"""LoRA through peft (docs/design.md §15.38 LoRA through peft, merged when published): only
the adapters train, the KL reference is the base with adapters disabled, published weights
and the export are plain merged HF directories that workers load unchanged, checkpoints
hold the adapter and its optimizer state, resume and replay reproduce a LoRA run. Tiny
model, CPU, fakeredis."""
from __future__ import annotations

import json

import pytest
import torch
from factories import legacy_config

from rlstream.builtin.tiny_model import build_model, build_tokenizer, save_tiny_model
from rlstream.core import bus, keys, weights
from rlstream.core.config import Config, load_config
from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.messages import GroupAdmitted, RolloutRecord, StepCommitted, group_id_for, sample_id_for
from rlstream.sampling.local import LocalPolicy
from rlstream.sampling.torch_setup import load_model_and_tokenizer
from rlstream.trainer import lora
from rlstream.trainer.checkpoint import CheckpointState, checkpoint_dir, load_checkpoint, save_checkpoint
from rlstream.trainer.optimize import make_optimizer, policy_update
from rlstream.trainer.policy_model import load_reference, token_logprobs, write_weights
from rlstream.trainer.replay_run import replay_run
from rlstream.trainer.trainer import Trainer

CPU = torch.device("cpu")
RUN = "lora"
TOKENS = torch.tensor([[3, 13, 4, 14, 7, 1], [5, 13, 9, 14, 8, 1]])  # "a+b=c<eos>" in the tiny vocabulary


def lora_cfg(tmp_path=None, **over) -> Config:
    fields = {"run_id": RUN, "prompt_groups_per_step": 1, "completions_per_prompt": 2, "lora_rank": 4,
              "learning_rate": 1e-2, "max_steps": 2, "dcp_save_interval": 0,
              "max_head_offpolicy_versions": 1}  # groups of v0 train at later steps (the default is 0 now)
    if tmp_path is not None:
        fields["log_path"] = str(tmp_path)
    fields.update(over)
    return legacy_config(**fields)


def wrapped(**over):
    model = lora.wrap(build_model(0).train(), lora_cfg(**over))
    with torch.no_grad():  # B = 0 at init makes the adapters a no-op: give them something to merge
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model


def logits(model, tokens=TOKENS) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=tokens).logits
    model.train(was)
    return out


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_only_the_adapters_train_and_the_optimizer_holds_only_them():
    model = lora.wrap(build_model(0).train(), lora_cfg(lora_alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # "all-linear": every projection of both layers, never the (tied) embedding / output head
    assert len(trainable) == 2 * 7 * 2 and not any("embed" in n or "lm_head" in n for n in trainable)
    assert model.peft_config[lora.ADAPTER].lora_alpha == 8 and model.peft_config[lora.ADAPTER].lora_dropout == 0.0
    optimizer = make_optimizer(model, lora_cfg())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad}
    torch.testing.assert_close(logits(model), logits(build_model(0)), rtol=0, atol=0)  # B = 0: starts as the base
    assert lora.lora_alpha(lora_cfg(lora_rank=16)) == 32  # unset = 2 x rank


def test_target_modules_list_and_a_missing_module_is_an_error():
    model = lora.wrap(build_model(0), lora_cfg(lora_target_modules=["q_proj", "v_proj"]))
    assert {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad} == {"q_proj", "v_proj"}
    with pytest.raises(RlstreamError, match="lora_target_modules"):
        lora.wrap(build_model(0), lora_cfg(lora_target_modules=["no_such_proj"]))
    for tied in ("lm_head", "embed_tokens"):  # the tiny model ties them: one merged weight cannot be both
        with pytest.raises(RlstreamError, match=rf"adapts \['.*{tied}'\], whose weight base_model ties"):
            lora.wrap(build_model(0), lora_cfg(lora_target_modules=[tied]))


def test_reference_is_the_base_with_adapters_disabled_and_no_copy():
    model = wrapped()
    ref = load_reference(lora_cfg(kl_beta=0.1), model, build_tokenizer(), CPU)
    assert isinstance(ref, lora.AdapterDisabled) and list(ref.parameters()) == []  # no second model
    with torch.no_grad():
        ref_logits = ref(input_ids=TOKENS).logits
    torch.testing.assert_close(ref_logits, logits(build_model(0)), rtol=0, atol=0)
    assert not torch.allclose(ref_logits, logits(model))  # the adapters are back on afterwards
    assert model.training  # the policy's mode is restored
    attention = torch.ones_like(TOKENS)
    ref_B_T = token_logprobs(ref, TOKENS, attention, 1.0)
    torch.testing.assert_close(ref_B_T, token_logprobs(build_model(0), TOKENS, attention, 1.0), rtol=0, atol=0)


def test_kl_against_the_disabled_adapters_starts_at_zero_and_grows():
    from rlstream.trainer.batch import collate

    model = lora.wrap(build_model(0).train(), lora_cfg())
    cfg = lora_cfg(kl_beta=0.1, prompt_groups_per_step=1, completions_per_prompt=2)
    ref, optimizer = load_reference(cfg, model, build_tokenizer(), CPU), make_optimizer(model, cfg)
    samples = [RolloutRecord(tokens=t, logprobs=[0.0] + [-2.0] * 5, loss_mask=[0, 0, 0, 0, 1, 1], reward=float(i))
               for i, t in enumerate(TOKENS.tolist())]
    batch = collate(samples, torch.tensor([-1.0, 1.0]), 0, CPU)
    kls = [policy_update(model, optimizer, batch, cfg=cfg, lr=0.05, ref_model=ref)["train/ref_kl"] for _ in range(3)]
    assert kls[0] == pytest.approx(0.0, abs=1e-7) and kls[-1] > 1e-6


def test_published_weights_are_a_plain_merged_hf_directory(tmp_path):
    model, tokenizer = wrapped(), build_tokenizer()
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    published = write_weights(model, tokenizer, tmp_path, 3, keep=2)
    directory = tmp_path / "weights" / "v3"
    weights.verify(directory, published.sha256)
    assert not (directory / lora.ADAPTER_CONFIG).exists() and (directory / "config.json").is_file()
    # from_pretrained loads it as the base architecture, with the adapters merged in
    merged, _ = load_model_and_tokenizer(str(directory), CPU)
    assert type(merged) is type(build_model(0)) and not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(logits(merged), logits(model), rtol=0, atol=1e-5)
    # a worker's LocalPolicy loads it, and loads it in place into a live base model
    worker = LocalPolicy(published, CPU, tmp_path / "weights")
    torch.testing.assert_close(logits(worker.model), logits(model), rtol=0, atol=1e-5)
    live = LocalPolicy(write_weights(build_model(0), tokenizer, tmp_path, 0, keep=2), CPU, tmp_path / "weights")
    live.load(published)
    torch.testing.assert_close(logits(live.model), logits(model), rtol=0, atol=1e-5)
    # merging did not touch the training model's frozen base
    after = {k: v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    assert all(torch.equal(before, after[k]) for k, before in base_before.items())


def test_evaluation_samples_from_the_live_lora_policy_with_its_logprobs():
    model, tokenizer = wrapped(), build_tokenizer()
    policy = LocalPolicy.from_model(model, tokenizer, CPU, version=0)  # what Trainer.evaluate does
    torch.manual_seed(0)
    (completion,) = policy.generate([tokenizer("3+4=")["input_ids"]], max_tokens=3, temperature=1.0)
    tokens = torch.tensor([completion.full_tokens])
    trainer_T = token_logprobs(model, tokens, torch.ones_like(tokens), 1.0)[0, completion.prompt_len - 1:]
    torch.testing.assert_close(trainer_T, torch.tensor(completion.inference_logprobs), atol=1e-5, rtol=0)
    assert model.training


def test_merged_weights_keep_the_dtype_the_base_is_stored_in():
    model = lora.wrap(build_model(0).to(torch.bfloat16), lora_cfg())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}  # peft's float32 adapters
    merged = lora.merged_state_dict(model)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}
    assert merged.keys() == build_model(0).state_dict().keys()


def test_non_finite_adapter_is_never_published(tmp_path):
    model = wrapped()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_A" in n)[0, 0] = float("nan")
    with pytest.raises(RlstreamError, match="not all finite"):
        write_weights(model, build_tokenizer(), tmp_path, 1, keep=2)
    assert not (tmp_path / "weights" / "v1").exists()


def stepped(model, optimizer) -> None:
    """One real optimizer step, so that AdamW holds moments to round-trip."""
    loss = model(input_ids=TOKENS).logits.square().mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_checkpoint_holds_the_adapter_and_its_optimizer_state_and_round_trips(tmp_path):
    cfg = lora_cfg()
    model = wrapped()
    optimizer = make_optimizer(model, cfg)
    stepped(model, optimizer)
    path = save_checkpoint(tmp_path, CheckpointState(1, 1, "1-0", 4), model, build_tokenizer(), optimizer)
    files = {p.name for p in path.iterdir()}
    assert {lora.ADAPTER_WEIGHTS, lora.ADAPTER_CONFIG, "dcp", "rng", "state.json"} <= files
    assert "model.safetensors" not in files  # not the frozen base
    assert json.loads((path / lora.ADAPTER_CONFIG).read_text())["r"] == 4

    fresh = lora.wrap(build_model(0).train(), cfg)
    fresh_optimizer = make_optimizer(fresh, cfg)
    state = load_checkpoint(path, fresh, fresh_optimizer, CPU)
    assert (state.step, state.version) == (1, 1)
    mine, theirs = adapter(model), adapter(fresh)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["state"].keys() == loaded["state"].keys() and saved["state"]
    for i, s in saved["state"].items():
        assert all(torch.equal(s[k], loaded["state"][i][k]) for k in s)
    # the same next step from both
    stepped(model, optimizer)
    stepped(fresh, fresh_optimizer)
    assert all(torch.equal(a, b) for a, b in zip(adapter(model).values(), adapter(fresh).values()))


def test_checkpoint_of_another_kind_or_shape_is_refused(tmp_path):
    model = wrapped()
    lora_path = save_checkpoint(tmp_path / "a", CheckpointState(1, 1, "1-0", 0), model, build_tokenizer(),
                                make_optimizer(model, lora_cfg()))
    full = build_model(0)
    with pytest.raises(RlstreamError, match="holds a LoRA adapter but this run trains with full fine-tuning"):
        load_checkpoint(lora_path, full, make_optimizer(full, legacy_config()), CPU)
    other = lora.wrap(build_model(0), lora_cfg(lora_rank=8))
    with pytest.raises(RlstreamError, match=r"lora_rank 4 \(this run: 8\)"):
        load_checkpoint(lora_path, other, make_optimizer(other, lora_cfg()), CPU)
    full_path = save_checkpoint(tmp_path / "b", CheckpointState(1, 1, "1-0", 0), full, build_tokenizer(),
                                make_optimizer(full, legacy_config()))
    fresh = lora.wrap(build_model(0), lora_cfg())
    with pytest.raises(RlstreamError, match="holds full weights but this run trains with LoRA"):
        load_checkpoint(full_path, fresh, make_optimizer(fresh, lora_cfg()), CPU)


# ----------------------------------------------------------------- the trainer, on fakeredis
def add_group(r, row: int) -> None:
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0,
                                                submit_version=0, group_size=2))
    for m in range(2):
        bus.xadd(r, keys.rollouts(RUN), RolloutRecord(
            tokens=[3, 13, 4, 14, 5 + m], logprobs=[0.0, -1.0, -1.0, -1.0, -2.0], loss_mask=[0, 0, 0, 0, 1],
            reward=float(m), sample_id=sample_id_for(gid, m), group_id=gid, group_size=2, row_index=row))


@pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py
def test_a_lora_trainer_resumed_from_its_checkpoint_reproduces_the_adapter(r, tmp_path):
    for row in range(3):
        add_group(r, row)
    cfg = lora_cfg(tmp_path, max_steps=3, dcp_save_interval=2, kl_beta=0.05, output_model_id="out")
    first = Trainer(cfg, r, cfg.run_dir())
    assert first.run() == 3
    run_dir = cfg.run_dir()
    assert lora.holds_adapter(checkpoint_dir(run_dir, 2)) and lora.holds_adapter(checkpoint_dir(run_dir, 3))
    for path in (run_dir / "weights" / "v3", run_dir / "models" / "out"):  # merged, plain HF directories
        assert not (path / lora.ADAPTER_CONFIG).exists()
        torch.testing.assert_close(logits(load_model_and_tokenizer(str(path), CPU)[0]), logits(first.model),
                                   rtol=0, atol=1e-5)
    # A restarted trainer: checkpoint step 2 (the final one, step 3, is set aside), then step 3 replayed.
    checkpoint_dir(run_dir, 3).rename(run_dir / "checkpoints" / "old-step-3")
    again = Trainer(cfg, r, run_dir)
    again.resume()
    assert (again.step, again.version) == (3, 3)
    mine, theirs = adapter(first.model), adapter(again.model)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert any(not torch.equal(v, adapter(lora.wrap(build_model(0), cfg))[k]) for k, v in mine.items())  # it trained


@pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py
def test_replay_with_a_lora_config_trains_the_recorded_steps(r, tmp_path):
    for row in range(2):
        add_group(r, row)
    source = legacy_config(run_id=RUN, log_path=str(tmp_path), prompt_groups_per_step=1, completions_per_prompt=2,
                           max_steps=2, learning_rate=1e-2, max_head_offpolicy_versions=1)
    assert Trainer(source, r, source.run_dir()).run() == 2
    recorded = [m for _, m in bus.iter_all_events(r, RUN) if isinstance(m, StepCommitted)]
    cfg = lora_cfg(tmp_path, run_id="lora-replay", max_steps=None, output_model_id="m", kl_beta=0.1)
    assert replay_run(cfg, r, RUN) == 2
    run_dir = cfg.run_dir()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["replay/source_step"] for m in lines] == [c.step for c in recorded]
    assert lora.holds_adapter(checkpoint_dir(run_dir, 2))
    model, _ = load_model_and_tokenizer(str(run_dir / "models" / "m"), CPU)  # merged
    assert not (run_dir / "models" / "m" / lora.ADAPTER_CONFIG).exists()
    base, _ = load_model_and_tokenizer(str(save_tiny_model(tmp_path / "b")), CPU)
    assert not torch.equal(logits(model), logits(base))


@pytest.mark.parametrize("override, message", [
    ("lora_rank=-1", "lora_rank: Input should be greater than or equal to 0"),
    ("lora_rank=true", "lora_rank: Input should be a valid integer"),
    ("lora_alpha=0", "lora_alpha: Input should be greater than or equal to 1"),
    ("lora_target_modules=[]", "List should have at least 1 item"),
    ('lora_target_modules=["../x"]', "String should match pattern"),
])
def test_lora_config_is_checked_before_anything_starts(override, message):
    assert load_config(None, ["lora_rank=8", "lora_target_modules=all-linear"], environ={}).lora_rank == 8
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override], environ={})


def test_merged_weights_from_a_gathered_state_dict_are_the_live_merge():
    """A sharded policy publishes ``merged_from_full`` of its gathered state dict (the names
    ``state_dict()`` gives): the very tensors ``merged_state_dict`` computes on the live model."""
    model = wrapped()
    optimizer = make_optimizer(model, lora_cfg())
    stepped(model, optimizer)  # B != 0: the merge is not the base
    live = lora.merged_state_dict(model)
    gathered = lora.merged_from_full(model, {k: v.detach().clone() for k, v in model.state_dict().items()})
    assert live.keys() == gathered.keys()
    assert all(torch.equal(live[k], gathered[k]) and live[k].dtype == gathered[k].dtype for k in live)
    assert not torch.equal(live["model.layers.0.self_attn.q_proj.weight"],
                           model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)


def test_a_lora_checkpoint_on_another_base_is_refused(tmp_path, caplog):
    # docs/design.md §15.95 A LoRA checkpoint names the base it was trained on: the adapter loads into any base of
    # the same shapes without an error, so the base's fingerprint is recorded and compared.
    model = wrapped()
    optimizer = make_optimizer(model, lora_cfg())
    stepped(model, optimizer)
    path = save_checkpoint(tmp_path, CheckpointState(1, 1, "1-0", 0, base_fingerprint="a" * 64), model,
                           build_tokenizer(), optimizer)
    fresh = wrapped()
    with pytest.raises(RlstreamError, match="other base weights than base_model's"):
        load_checkpoint(path, fresh, make_optimizer(fresh, lora_cfg()), CPU, base_fingerprint="b" * 64)
    assert load_checkpoint(path, fresh, make_optimizer(fresh, lora_cfg()), CPU,
                           base_fingerprint="a" * 64).base_fingerprint == "a" * 64
    before = save_checkpoint(tmp_path / "before", CheckpointState(1, 1, "1-0", 0), model, build_tokenizer(),
                             optimizer)  # written before bases were recorded: loaded, with a warning
    with caplog.at_level("WARNING"):
        load_checkpoint(before, fresh, make_optimizer(fresh, lora_cfg()), CPU, base_fingerprint="b" * 64)
    assert "does not record which base weights" in caplog.text


@pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py
def test_a_lora_run_records_its_base_and_a_new_run_on_another_base_refuses_it(r, tmp_path):
    for row in range(2):
        add_group(r, row)
    cfg = lora_cfg(tmp_path, max_steps=2, dcp_save_interval=2)
    assert Trainer(cfg, r, cfg.run_dir()).run() == 2
    checkpoint = checkpoint_dir(cfg.run_dir(), 2)
    recorded = json.loads((checkpoint / "state.json").read_text())["base_fingerprint"]
    assert recorded == weights.weights_fingerprint(cfg.run_dir() / "base_model")
    same, other = save_tiny_model(tmp_path / "same", seed=0), save_tiny_model(tmp_path / "other", seed=1)
    assert weights.weights_fingerprint(same) == recorded  # the same weights, written again elsewhere
    ok = lora_cfg(tmp_path, run_id="same-base", base_model=str(same), init_from_checkpoint=str(checkpoint))
    Trainer(ok, r, ok.run_dir())
    bad = lora_cfg(tmp_path, run_id="other-base", base_model=str(other), init_from_checkpoint=str(checkpoint))
    with pytest.raises(RlstreamError, match="trained on other base weights"):
        Trainer(bad, r, bad.run_dir())


@pytest.mark.numeric
def test_the_lora_policy_and_its_reference_keep_only_the_trained_targets_logits():
    # peft's wrapper and the adapter-less reference pass logits_to_keep on to the model they run
    # (docs/design.md §15.97 Logits only where a target is trained)
    from rlstream.trainer.policy_model import keeps_logits, token_logprobs

    model = wrapped()
    assert keeps_logits(model) and keeps_logits(lora.AdapterDisabled(model))
    seen: list[int] = []
    model.get_base_model().lm_head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    tokens = TOKENS
    with torch.no_grad():
        every = token_logprobs(model, tokens, torch.ones_like(tokens), 1.0)
        for scorer in (model, lora.AdapterDisabled(model)):
            kept = token_logprobs(scorer, tokens, torch.ones_like(tokens), 1.0, first=2)
            if scorer is model:
                torch.testing.assert_close(kept, every[:, 2:], rtol=0, atol=1e-5)
    N = TOKENS.shape[1]
    assert seen == [N, N - 2, N - 2]
