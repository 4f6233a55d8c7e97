"""The SDK's training client, reference client and deployment on the tiny model, over
fakeredis: the objective's tensors, gradient accumulation, optim_step and its event, the
non-finite guard, sampler snapshots and their sync, states saved and loaded, the lease fence
(docs/design.md §15.65 The SDK trains in the caller's process, §15.66 The SDK's events: steps,
snapshots and states in the run's log)."""
from __future__ import annotations

import asyncio
import copy
import json
import shutil

import pytest
import torch

from rlstream.core import bus
from rlstream.core.config import validate_config
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import OptimStepped, SamplerSaved, StateLoaded, StateSaved
from rlstream.core.metrics import read_metrics
from rlstream.sdk.ledger import Ledger
from rlstream.sdk.sampler import Deployment, DeploymentSampler
from rlstream.sdk.session import Session
from rlstream.sdk.training import ReferenceClient, TrainingClient, frozen_base
from rlstream.sdk.types import AdamParams, Datum
from rlstream.trainer.lease import TrainerLease


@pytest.fixture
def session(r, tmp_path):
    cfg = validate_config({"base_model": "builtin:tiny", "run_id": "sdk", "log_path": str(tmp_path)})
    lease = TrainerLease(r, "sdk")
    lease.hold()
    yield Session(cfg, tmp_path / "sdk", r, lease, Ledger(), torch.device("cpu"))
    lease.release()


@pytest.fixture
def policy(session):
    from rlstream.builtin.tiny_model import build_tokenizer

    torch.manual_seed(0)
    return TrainingClient(session, build_tokenizer())


DATA = [Datum(tokens=[6, 13, 7, 14, 12], loss_fn_inputs={"w": 1.0}),
        Datum(tokens=[3, 13, 4, 14], loss_fn_inputs={"w": -0.5})]


def weighted(data, logprobs_list):
    loss = -sum(d.loss_fn_inputs["w"] * lp.sum() for d, lp in zip(data, logprobs_list))
    return loss, {"custom": 2.0}


def events(session, kind):
    return [m for _, m in bus.iter_all_events(session.r, session.run_id) if isinstance(m, kind)]


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_objective_gets_one_differentiable_tensor_per_datum(policy):
    seen = {}

    def objective(data, logprobs_list):
        seen["shapes"] = [tuple(lp.shape) for lp in logprobs_list]
        seen["grad"] = all(lp.requires_grad for lp in logprobs_list)
        seen["values"] = [lp.detach().clone() for lp in logprobs_list]
        return weighted(data, logprobs_list)

    out = policy.forward_backward_custom(DATA, objective).result()
    assert seen["shapes"] == [(4,), (3,)] and seen["grad"]
    with pytest.raises(ValueError, match="token id 999 outside the model's vocabulary"):
        policy.forward([Datum(tokens=[1, 999])])
    assert out.metrics["custom"] == 2.0 and "loss" in out.metrics
    plain = policy.forward(DATA).result().loss_fn_outputs
    for got, want in zip(plain, seen["values"]):  # padding changes nothing: the forward is the same
        assert torch.allclose(got["logprobs"].to_torch(), want, atol=1e-5)


def test_gradients_accumulate_across_calls_until_optim_step(policy):
    policy.forward_backward_custom(DATA, weighted)
    together = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    policy.model.zero_grad(set_to_none=True)
    policy.forward_backward_custom(DATA[:1], weighted)
    policy.forward_backward_custom(DATA[1:], weighted)
    for n, p in policy.model.named_parameters():
        if n in together:
            assert torch.allclose(p.grad, together[n], atol=1e-5), n


def test_optim_step_applies_adam_params_and_logs_the_step(policy, session):
    before = params(policy.model)
    with pytest.raises(RlstreamError, match="no forward_backward"):
        policy.optim_step(AdamParams(learning_rate=1e-2))
    policy.forward_backward_custom(DATA, weighted)
    policy.forward_backward_custom(DATA, weighted)
    result = policy.optim_step(AdamParams(learning_rate=1e-2, beta1=0.8, beta2=0.99, weight_decay=0.1)).result()
    group = policy.optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-2, (0.8, 0.99), 0.1)
    assert any(not torch.equal(before[k], v) for k, v in policy.model.state_dict().items())
    assert all(p.grad is None for p in policy.model.parameters())  # the next step starts from zero
    [logged] = events(session, OptimStepped)
    assert logged.step == result.step == 1
    assert logged.metrics["train/custom"] == 2.0 and logged.metrics["train/forward_backward_calls"] == 2
    assert logged.metrics["train/datums"] == 4 and logged.metrics["train/lr"] == 1e-2
    assert read_metrics(session.run_dir / "metrics.jsonl") == [{"step": 1, **logged.metrics}]


def test_a_non_finite_loss_skips_the_step(policy, session):
    before = params(policy.model)
    policy.forward_backward_custom(DATA, weighted)
    policy.forward_backward_custom(DATA, lambda d, lps: (lps[0].sum() * float("nan"), {}))
    result = policy.optim_step(AdamParams(learning_rate=1e-2)).result()
    assert result.metrics["train/nonfinite_skipped"] == 1
    assert all(torch.equal(before[k], v) for k, v in policy.model.state_dict().items())


def test_sampler_snapshots_sync_the_deployment_and_are_verified(policy, session):
    first = policy.save_weights_for_sampler("snap").result()
    policy.forward_backward_custom(DATA, weighted)
    policy.optim_step(AdamParams(learning_rate=5e-2))
    second = policy.save_weights_for_sampler("snap").result()  # a name saved again: its newest snapshot
    assert first.path == second.path == "rlstream://sdk/sampler_weights/snap"
    assert [e.version for e in events(session, SamplerSaved)] == [1, 2]
    deployment = Deployment(session, policy.tokenizer)
    deployment.sync(second.path)
    assert deployment.policy.version == 2
    for name, value in deployment.policy.model.state_dict().items():
        assert torch.allclose(value, policy.model.state_dict()[name], atol=1e-6), name
    sampler = DeploymentSampler(deployment, policy.tokenizer, "controller", {"max_tokens": 1, "temperature": 1.0})
    completions = asyncio.run(sampler.sample_with_tokens([{"role": "user", "content": "3+4"}], n=3))
    assert len(completions) == 3 and all(c.version == 2 for c in completions)
    assert sampler.concurrency_controller == "controller"
    with pytest.raises(RlstreamError, match="no sampler snapshot 'other'"):
        deployment.sync("rlstream://sdk/sampler_weights/other")
    (session.run_dir / "weights/v2/model.safetensors").write_bytes(b"tampered")
    with pytest.raises(RlstreamError, match="cannot be loaded"):
        deployment.sync(second.path)


def test_save_and_load_state_restore_weights_optimizer_and_step(policy, session):
    policy.forward_backward_custom(DATA, weighted)
    policy.optim_step(AdamParams(learning_rate=1e-2))
    saved = policy.save_state("s1").result()
    weights_then, moments_then = params(policy.model), copy.deepcopy(policy.optimizer.state_dict())
    policy.forward_backward_custom(DATA, weighted)
    policy.optim_step(AdamParams(learning_rate=1e-2))
    assert policy.step == 2
    policy.load_state_with_optimizer(saved.path).result()
    assert policy.step == 1
    assert all(torch.equal(weights_then[k], v) for k, v in policy.model.state_dict().items())
    moments_now = policy.optimizer.state_dict()["state"]
    for key, state in moments_then["state"].items():
        assert torch.equal(state["exp_avg"], moments_now[key]["exp_avg"])
        assert torch.equal(state["exp_avg_sq"], moments_now[key]["exp_avg_sq"])
    assert [(e.name, e.step) for e in events(session, StateSaved)] == [("s1", 1)]
    assert [(e.name, e.step, e.with_optimizer) for e in events(session, StateLoaded)] == [("s1", 1, True)]
    shutil.rmtree(session.run_dir / "states/s1")
    with pytest.raises(RlstreamError, match="cannot be loaded"):
        policy.load_state("s1")


def test_every_write_is_fenced_by_the_trainer_lease(policy, session):
    session.r.set(session.lease.key, "another-trainer")  # another trainer took the run over
    policy.forward_backward_custom(DATA, weighted)
    with pytest.raises(RlstreamError, match="another-trainer"):
        policy.optim_step(AdamParams(learning_rate=1e-2))
    assert events(session, OptimStepped) == []


def test_the_reference_stays_at_the_base_while_the_policy_moves(policy, session):
    reference = ReferenceClient(frozen_base(session, None, policy.tokenizer), policy.pad_id, policy.precision,
                                session.device)
    base = [o["logprobs"].data for o in reference.forward(DATA, "cross_entropy").loss_fn_outputs]
    for got, want in zip(base, [o["logprobs"].data for o in policy.forward(DATA).result().loss_fn_outputs]):
        assert got == pytest.approx(want, abs=1e-5)
    policy.forward_backward_custom(DATA, weighted)
    policy.optim_step(AdamParams(learning_rate=5e-2))
    assert [o["logprobs"].data for o in reference.forward(DATA).result().loss_fn_outputs] == base
    with pytest.raises(ValueError, match="cross_entropy"):
        reference.forward(DATA, "ppo")


def test_a_remote_deployment_is_told_to_load_the_snapshot_directory(policy, session):
    import httpx

    from rlstream.core.config import InferenceConfig
    from rlstream.core.errors import ConfigError
    from rlstream.sdk import FixedConcurrencyController

    synced, asked = [], []

    def completions(request):
        asked.append(request)
        choice = {"index": 0, "token_ids": [12], "text": "9", "finish_reason": "length",
                  "logprobs": {"token_logprobs": [-0.5]}}
        return httpx.Response(200, json={"choices": [choice]})

    def sync(request):
        synced.append(request.read())
        return httpx.Response(200, json={"success": True})

    transports = (httpx.MockTransport(completions), httpx.MockTransport(sync))
    saved = policy.save_weights_for_sampler("remote-1").result()
    no_sync = InferenceConfig(backend="openai", base_url="http://inference/v1")
    session.cfg = session.cfg.model_copy(update={"inference": no_sync})
    with pytest.raises(ConfigError, match="weight_sync_url is unset"):
        Deployment(session, policy.tokenizer, transports).sync(saved.path)
    inference = no_sync.model_copy(update={"weight_sync_url": "http://inference/update_weights_from_disk"})
    session.cfg = session.cfg.model_copy(update={"inference": inference})
    deployment = Deployment(session, policy.tokenizer, transports)
    deployment.sync(saved.path)
    assert [json.loads(body) for body in synced] == [
        {"model_path": str((session.run_dir / "weights/v1").resolve()), "version": 1}]
    controller = FixedConcurrencyController(2)  # the seed passes its controller to the deployment sampler
    sampler = DeploymentSampler(deployment, policy.tokenizer, controller, {"max_tokens": 1, "temperature": 1.0})
    [c] = asyncio.run(sampler.sample_with_prompt_tokens([6, 13, 7, 14]))
    assert (c.output_tokens, c.inference_logprobs, c.version) == ([12], [-0.5], 1)
    assert controller.peak_in_flight == 1 and controller.in_flight == 0  # the request went through its window
    deployment.sync(saved.path)  # the same snapshot again (or an older one) is still sent
    assert len(synced) == 2
    deployment.close()


def test_dcp_save_interval_saves_states_as_the_steps_go(policy, session):
    session.cfg = session.cfg.model_copy(update={"dcp_save_interval": 2})
    for _ in range(3):
        policy.forward_backward_custom(DATA, weighted)
        policy.optim_step(AdamParams(learning_rate=1e-2))
    assert [(e.name, e.step) for e in events(session, StateSaved)] == [("auto-step-000002", 2)]
