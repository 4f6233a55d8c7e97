"""``rlstream.sdk``: the SDK lifecycle of research loops (train -> save -> sync -> sample), shaped
like the Fireworks / Tinker SDK so seed code ports with its imports changed
(docs/design.md §15.65 The SDK trains in the caller's process)::

    from rlstream.sdk import AdamParams, Datum, ServiceClient

    service = ServiceClient.from_config(base_model="builtin:tiny", lora_rank=0, learning_rate=1e-3)
    policy = service.create_training_client()
    policy.forward_backward_custom(datums, objective).result()
    policy.optim_step(AdamParams(learning_rate=1e-3)).result()
    saved = policy.save_weights_for_sampler("step-00001").result()
    sampler = service.create_deployment_sampler(model_path=saved.path)
    service.close()

and the seed's loop helpers: ``DeploymentSampler(inference_url=service.inference_url, ...)``,
``WeightSyncer(policy_client=policy, deploy_mgr=service).save_and_hotload(name)``,
``build_grpo_datums(completions)``, ``make_grpo_loss_fn(rewards, ref_logprobs, kl_beta)``.

Importing it imports torch (the training client lives in the caller's process).
"""
from rlstream.core.cookbook_config import WeightSyncScope
from rlstream.core.rollout import Completion
from rlstream.sampling.concurrency import AdaptiveConcurrencyController, FixedConcurrencyController
from rlstream.sdk.losses import build_grpo_datums, make_grpo_loss_fn
from rlstream.sdk.sampler import DeploymentSampler, SamplingClient
from rlstream.sdk.service import ServiceClient
from rlstream.sdk.training import ReferenceClient, TrainingClient
from rlstream.sdk.types import (
    AdamParams,
    Datum,
    Done,
    ForwardBackwardOutput,
    ModelInput,
    OptimStepResult,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    SaveResult,
    TensorData,
)
from rlstream.sdk.weight_sync import WeightSyncer

FiretitanServiceClient = ServiceClient  # the seed's name

__all__ = ["AdamParams", "AdaptiveConcurrencyController", "Completion", "Datum", "DeploymentSampler", "Done",
           "FiretitanServiceClient", "FixedConcurrencyController", "ForwardBackwardOutput", "ModelInput",
           "OptimStepResult", "ReferenceClient", "SampleResponse", "SampledSequence", "SamplingClient",
           "SamplingParams", "SaveResult", "ServiceClient", "TrainingClient", "TensorData", "WeightSyncScope",
           "WeightSyncer", "build_grpo_datums", "make_grpo_loss_fn"]
