"""The SDK helpers the seeds call, with the seeds' signatures (issue 22 item 6): ``TensorData(data=,
dtype=, shape=)``, ``build_grpo_datums`` and ``make_grpo_loss_fn`` (checked number by number),
``DeploymentSampler(inference_url=, model=, api_key=, tokenizer=, concurrency_controller=)``
against a server, ``WeightSyncer(...).save_and_hotload(name)``, ``WeightSyncScope`` and
``service.deployment_id``; and the seed's API-level GRPO loop block, run on the tiny model over
fakeredis with its imports and model names changed."""
from __future__ import annotations

import asyncio
import dataclasses
import json

import httpx
import pytest
import torch

from rlstream.core.config import validate_config
from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.rollout import Completion, RolloutSample
from rlstream.sdk import (
    AdamParams,
    AdaptiveConcurrencyController,
    Datum,
    DeploymentSampler,
    FixedConcurrencyController,
    ModelInput,
    WeightSyncer,
    WeightSyncScope,
    build_grpo_datums,
    make_grpo_loss_fn,
)
from rlstream.sdk.ledger import Ledger
from rlstream.sdk.service import ServiceClient
from rlstream.sdk.session import Session
from rlstream.sdk.types import TensorData
from rlstream.trainer.lease import TrainerLease


# --------------------------------------------------------------------------- TensorData
def test_tensor_data_takes_the_seeds_keywords_and_keeps_its_one_argument_form():
    targets = TensorData(data=[6, 7, 8, 9], dtype="int64", shape=[2, 2])
    assert targets.to_torch().dtype == torch.int64 and targets.to_torch().tolist() == [[6, 7], [8, 9]]
    assert targets.tolist() == [6, 7, 8, 9] and targets.data == [6, 7, 8, 9]
    plain = TensorData([0.5, -1.0])  # the form results were built with before
    assert (plain.dtype, plain.shape, plain.to_torch().dtype) == ("float32", None, torch.float32)
    back = TensorData.from_torch(torch.tensor([[1.5, 2.0]], requires_grad=True))
    assert (back.data, back.dtype, back.shape) == ([1.5, 2.0], "float32", [1, 2])
    assert TensorData.from_torch(torch.tensor([3, 4])) == TensorData([3, 4], "int64", [2])
    with pytest.raises(ValueError, match="shape \\[3\\] holds 3 values, data has 2"):
        TensorData(data=[1, 2], dtype="int64", shape=[3])
    with pytest.raises(ValueError, match="dtype must be one of float32, int64"):
        TensorData(data=[1], dtype="float64")
    # Tinker's datum form reads its targets through TensorData
    datum = Datum(model_input=ModelInput.from_ints([6, 7]),
                  loss_fn_inputs={"target_tokens": TensorData(data=[7, 8], dtype="int64", shape=[2])})
    assert datum.tokens == [6, 7, 8]


# --------------------------------------------------------------------------- datums and the loss
def completion(prompt: list[int], output: list[int], logprobs: list[float]) -> Completion:
    return Completion(full_tokens=prompt + output, prompt_len=len(prompt), inference_logprobs=logprobs,
                      finish_reason="stop", text="", version=0)


def test_build_grpo_datums_marks_the_generated_predictions():
    [d] = build_grpo_datums([completion([6, 13, 7], [14, 12], [-0.1, -0.2])])
    assert d.tokens == [6, 13, 7, 14, 12]
    assert d.loss_fn_inputs["target_tokens"] == TensorData([13, 7, 14, 12], "int64", [4])
    assert d.loss_fn_inputs["weights"].data == [0.0, 0.0, 1.0, 1.0]  # predictions of 14 and 12 are trained
    assert d.loss_fn_inputs["logprobs"].data == [0.0, 0.0, -0.1, -0.2]
    # a multi-turn RolloutSample: its mask and logprobs are per token already (the first token is predicted by none)
    sample = RolloutSample(tokens=[1, 2, 3, 4, 5], logprobs=[0.0, -0.3, 0.0, 0.0, -0.4], loss_mask=[0, 1, 0, 0, 1],
                           reward=1.0)
    [m] = build_grpo_datums([sample])
    assert m.loss_fn_inputs["weights"].data == [1.0, 0.0, 0.0, 1.0]
    assert m.loss_fn_inputs["logprobs"].data == pytest.approx([-0.3, 0.0, 0.0, -0.4])  # float32 in the sample
    with pytest.raises(ValueError, match="one logprob per generated token"):
        build_grpo_datums([completion([6, 13], [14, 12], [-0.1])])
    with pytest.raises(TypeError, match="sampled completions"):
        build_grpo_datums([{"tokens": [1, 2]}])
    with pytest.raises(ValueError, match="tokens, logprobs and loss_mask must have equal lengths, got 5, 5, 4"):
        build_grpo_datums([dataclasses.replace(sample, loss_mask=[0, 1, 0, 1])])  # checked as a worker checks it


def test_the_grpo_loss_matches_a_hand_computation():
    """Two completions, rewards 1 and 0: A = +-1 (population std 0.5); loss = mean over the two of
    -A * (sum of the trained logprobs) + kl_beta * (sum of the trained policy - reference gaps)."""
    datums = build_grpo_datums([completion([6, 13], [7, 14], [-1.0, -1.0]), completion([3, 13], [4], [-1.0])])
    lp = [torch.tensor([-0.5, -1.0, -2.0], requires_grad=True), torch.tensor([-0.7, -3.0], requires_grad=True)]
    ref = [[-0.4, -1.5, -1.0], [-0.6, -2.0]]
    loss, metrics = make_grpo_loss_fn([1.0, 0.0], ref, kl_beta=0.1)(datums, lp)
    # datum 0: trained predictions are positions 1, 2 (weights 0, 1, 1); datum 1: position 1
    pg0, kl0 = -1.0 * (-1.0 + -2.0), (-1.0 - -1.5) + (-2.0 - -1.0)
    pg1, kl1 = +1.0 * (-3.0), (-3.0 - -2.0)
    want = ((pg0 + 0.1 * kl0) + (pg1 + 0.1 * kl1)) / 2
    assert float(loss.detach()) == pytest.approx(want, abs=1e-6)
    assert metrics["mean_kl"] == pytest.approx((kl0 + kl1) / 3) and metrics["response_tokens"] == 3
    assert (metrics["mean_reward"], metrics["mean_advantage"]) == (0.5, pytest.approx(0.0))
    loss.backward()
    # d loss / d lp: (-A + kl_beta) * w / 2
    assert lp[0].grad.tolist() == pytest.approx([0.0, (-1.0 + 0.1) / 2, (-1.0 + 0.1) / 2])
    assert lp[1].grad.tolist() == pytest.approx([0.0, (1.0 + 0.1) / 2])


def test_equal_rewards_give_no_signal_and_mismatches_are_named():
    datums = build_grpo_datums([completion([6], [7], [-1.0]), completion([6], [8], [-1.0])])
    lp = [torch.tensor([-0.5], requires_grad=True), torch.tensor([-0.9], requires_grad=True)]
    loss, metrics = make_grpo_loss_fn([1.0, 1.0], [[-0.5], [-0.9]], kl_beta=0.001)(datums, lp)
    assert float(loss.detach()) == 0.0 and metrics["mean_advantage"] == 0.0
    with pytest.raises(ValueError, match="2 rewards but 1 reference"):
        make_grpo_loss_fn([1.0, 0.0], [[-0.5]])
    with pytest.raises(ValueError, match="datum 1: 1 policy logprobs, 2 reference logprobs"):
        make_grpo_loss_fn([1.0, 0.0], [[-0.5], [-0.9, -1.0]])(datums, lp)


# --------------------------------------------------------------------------- DeploymentSampler from a URL
class Tokenizer:
    """What a sampler needs of one: a chat template (token ids out)."""

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=True, **_):
        return [len(m["content"]) for m in messages] + [1]


def test_a_deployment_sampler_built_from_a_url_samples_there_with_the_key_and_the_window():
    seen = []

    def server(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.read())
        seen.append((str(request.url), request.headers.get("authorization"), body))
        choices = [{"index": i, "token_ids": [40 + i], "text": str(i), "finish_reason": "stop",
                    "logprobs": {"token_logprobs": [-0.25]}} for i in range(body["n"])]
        return httpx.Response(200, json={"choices": choices})

    controller = AdaptiveConcurrencyController(initial_window=16)
    sampler = DeploymentSampler(inference_url="http://inference.test/v1", model="grpo-serving", api_key="secret",
                                tokenizer=Tokenizer(), concurrency_controller=controller,
                                transport=httpx.MockTransport(server))
    try:
        completions = asyncio.run(sampler.sample_with_tokens(messages=[{"role": "user", "content": "2+2"}], n=2,
                                                             max_tokens=8))
    finally:
        sampler.close()
    assert [(c.full_tokens, c.prompt_len, c.inference_logprobs) for c in completions] == [
        ([3, 1, 40], 2, [-0.25]), ([3, 1, 41], 2, [-0.25])]
    [(url, auth, body)] = seen
    assert url == "http://inference.test/v1/completions" and auth == "Bearer secret"
    assert (body["model"], body["prompt"], body["n"], body["max_tokens"]) == ("grpo-serving", [3, 1], 2, 8)
    assert sampler.model == "grpo-serving" and controller.in_flight == 0


@pytest.mark.parametrize("kwargs, error", [
    (dict(model="m", tokenizer=Tokenizer()), "needs inference_url="),
    (dict(inference_url="http://h/v1", model="m"), "needs tokenizer="),
    (dict(inference_url="http://h/v1", tokenizer=Tokenizer()), "needs model="),
    (dict(inference_url="ftp://h/v1", model="m", tokenizer=Tokenizer()), "an http(s):// API root"),
    (dict(inference_url="rlstream-local://gone", model="m", tokenizer=Tokenizer()), "names no open service"),
])
def test_a_deployment_sampler_says_what_it_is_missing(kwargs, error):
    with pytest.raises((TypeError, ConfigError, RlstreamError), match=error.replace("(", "\\(").replace(")", "\\)")):
        DeploymentSampler(**kwargs)


# --------------------------------------------------------------------------- the service side
@pytest.fixture
def service(r, tmp_path):
    cfg = validate_config({"base_model": "builtin:tiny", "run_id": "seed", "log_path": str(tmp_path),
                           "max_completion_tokens": 1})
    lease = TrainerLease(r, "seed")
    lease.hold()
    torch.manual_seed(0)
    svc = ServiceClient(Session(cfg, tmp_path / "seed", r, lease, Ledger(), torch.device("cpu")), None, False,
                        True, 1, deployment_id="grpo-serving")
    yield svc
    svc.close()


def test_the_service_names_the_deployment_it_was_given(service):
    assert service.deployment_id == "grpo-serving"
    assert service.inference_url == "rlstream-local://seed"
    unnamed = ServiceClient(service.session, None, False, False, 1)
    assert unnamed.deployment_id == "local"  # no id given: what serves (a local model, or the server's URL)
    assert WeightSyncScope.PER_TRAINER == "per_trainer" and WeightSyncScope("per_deployment")


def test_the_seeds_grpo_loop_block_runs_with_its_imports_changed(service):
    """The seed's 'Training loop' block, with ``policy`` / ``reference`` / ``deploy_mgr`` / ``sampler``
    as the service gives them, ``score`` the built-in task's and a group of 8 per row."""
    from rlstream.builtin.task import exact_match_reward

    base_model = "builtin:tiny"
    policy = service.create_training_client(base_model, lora_rank=0)
    reference = service.create_reference_client(base_model, lora_rank=0)
    deploy_mgr, api_key, tokenizer = service, "unused", policy.get_tokenizer()
    sampler = DeploymentSampler(
        inference_url=deploy_mgr.inference_url,
        model=deploy_mgr.deployment_id,
        api_key=api_key,
        tokenizer=tokenizer,
        concurrency_controller=AdaptiveConcurrencyController(initial_window=16),
    )
    tracker = WeightSyncer(
        policy_client=policy.inner,
        deploy_mgr=deploy_mgr,
        deployment_id="grpo-serving",
        base_model=base_model,
        hotload_timeout=600,
        first_checkpoint_type="base",
    )
    dataset = [{"messages": [{"role": "user", "content": f"{a}+{b}"}], "answer": str((a + b) % 10)}
               for a, b in [(3, 4), (1, 5), (2, 2), (6, 1), (0, 7), (4, 4)]]
    hotloaded = 0  # snapshots synced so far: the version the deployment serves
    for step, row in enumerate(dataset):
        input_messages = [m for m in row["messages"] if m.get("role") != "assistant"]
        completions = asyncio.run(sampler.sample_with_tokens(messages=input_messages, n=8, max_tokens=1))
        assert all(c.version == hotloaded for c in completions)  # the weights hotloaded last
        rewards = [exact_match_reward(c.text, row["answer"]) for c in completions]
        if len(set(rewards)) == 1:
            continue
        datums = build_grpo_datums(completions)
        ref_fwd = reference.forward(datums, "cross_entropy")
        ref_logprobs = [list(x["logprobs"].data) for x in ref_fwd.loss_fn_outputs]
        loss_fn = make_grpo_loss_fn(rewards, ref_logprobs, kl_beta=0.001)
        policy.forward_backward_custom(datums, loss_fn)
        policy.optim_step(AdamParams(learning_rate=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01))
        assert tracker.save_and_hotload(f"step-{step:05d}") == f"rlstream://seed/sampler_weights/step-{step:05d}"
        hotloaded += 1
    served = service._deployment.policy.model.state_dict()
    assert all(torch.allclose(served[k], v, atol=1e-6) for k, v in policy.model.state_dict().items())
    assert hotloaded >= 2 and policy.step == hotloaded  # seed 0: 3 of the 6 rows had mixed rewards
    assert tracker.save_dcp("final") == "rlstream://seed/state/final"


def test_the_weight_syncer_checks_what_it_is_given(service):
    policy = service.create_training_client()
    with pytest.raises(TypeError, match="the service's training client"):
        WeightSyncer(policy_client=object())
    with pytest.raises(ConfigError, match="base_model 'other' is not the service's"):
        WeightSyncer(policy_client=policy, base_model="other")
    with pytest.raises(ConfigError, match="deployment_id 'x' is not the service's"):
        WeightSyncer(policy_client=policy, deploy_mgr=service, deployment_id="x")
    with pytest.raises(ValueError, match="'base' or 'delta'"):
        WeightSyncer(policy_client=policy).save_and_hotload("s", checkpoint_type="full")
    # no deploy_mgr: the policy client's own service is hotloaded
    assert WeightSyncer(policy_client=policy).save_and_hotload("s") == "rlstream://seed/sampler_weights/s"
    assert service._deployment.model_path == "rlstream://seed/sampler_weights/s"


def test_a_failed_hotload_is_logged_and_answered_with_none(service, caplog):
    policy = service.create_training_client()

    def refuse(path):
        raise RlstreamError("the server refused")

    service.session.hotload = refuse
    assert WeightSyncer(policy_client=policy).save_and_hotload("s") is None
    assert "hotload of rlstream://seed/sampler_weights/s failed: the server refused" in caplog.text


def test_the_earlier_positional_deployment_sampler_still_works(service):
    deployment = service.deployment()
    defaults = {"max_tokens": 1, "temperature": 1.0}
    sampler = DeploymentSampler(deployment, service.tokenizer(), FixedConcurrencyController(2), defaults)
    assert sampler.deployment is deployment and sampler.defaults == defaults
    [c] = asyncio.run(sampler.sample_with_prompt_tokens([6, 13, 7, 14]))
    assert len(c.output_tokens) == 1
