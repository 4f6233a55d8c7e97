"""The Fireworks cookbook's config fields that only a hosted service can honour (training
shapes, deployment ids, regions, provisioning timeouts). A cookbook ``train.py`` copied to
rlstream sets them; they are accepted, stored as written, and reported once by
``rlstream up`` / ``rlstream.main`` as ignored, with the reason (docs/design.md §15.60
Cookbook config sections). Only pydantic here: ``config_sections`` mixes
``HostedTrainerFields`` into ``TrainerConfig`` and must not import the cookbook module.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

_SHAPE = "rlstream trains on this machine: the trainer's device is trainer.device (or device)"
_DEPLOYMENT = ("rlstream samples in its rollout workers (inference.backend = \"local\") or on your own server "
               "(inference.base_url): there is no deployment to provision")
_FILES = "weights travel as files under the run directory and workers pull them (docs/design.md §9 Weight sync)"

# field name -> why rlstream ignores it (the report quotes it)
HOSTED_REASONS: dict[str, str] = {
    "training_shape_id": _SHAPE,
    "ref_training_shape_id": "the reference model is loaded by the trainer when kl_beta > 0 (reference_model; unset "
                             "= base_model)",
    "region": _SHAPE,
    "custom_image_tag": _SHAPE,
    "accelerator_type": _SHAPE,
    "accelerator_count": _SHAPE,
    "node_count": _SHAPE,
    "trainer_timeout_s": "nothing is provisioned, so there is no trainer to wait for",
    "extra_args": _SHAPE,
    "deployment_id": _DEPLOYMENT,
    "deployment_shape": _DEPLOYMENT,
    "deployment_region": _DEPLOYMENT,
    "deployment_accelerator_type": _DEPLOYMENT,
    "hot_load_bucket_type": _FILES,
    "deployment_timeout_s": _DEPLOYMENT,
    "deployment_extra_args": _DEPLOYMENT,
    "disable_speculative_decoding": _DEPLOYMENT,
    "extra_values": _DEPLOYMENT,
    "weight_sync_scope": _FILES,
    "dcp_timeout": "checkpoints are local files the trainer writes itself, not a service call with a timeout",
    "first_checkpoint_type": "workers always start from v0, the base weights",
    "weight_sync_before_training": "v0 (the base weights) is always published before the first step",
    "weight_sync_timeout": "workers pull weights; a rollout job waits at most job_timeout for its version",
}


def hosted(reason_of: str) -> Any:
    """A hosted-only field: None = not set; any value is accepted and ignored."""
    return Field(None, description=f"hosted only, accepted and ignored: {HOSTED_REASONS[reason_of]}")


class HostedTrainerFields(BaseModel):
    """The cookbook's ``InfraConfig`` / ``TrainerConfig`` fields (a hosted trainer's shape)."""

    training_shape_id: str | None = hosted("training_shape_id")
    ref_training_shape_id: str | None = hosted("ref_training_shape_id")
    region: str | None = hosted("region")
    custom_image_tag: str | None = hosted("custom_image_tag")
    accelerator_type: str | None = hosted("accelerator_type")
    accelerator_count: int | None = hosted("accelerator_count")
    node_count: int | None = hosted("node_count")
    trainer_timeout_s: float | None = hosted("trainer_timeout_s")
    extra_args: list[str] | None = hosted("extra_args")


class HostedDeployFields(BaseModel):
    """The cookbook's ``DeployConfig`` fields that provision a hosted deployment."""

    deployment_id: str | None = hosted("deployment_id")
    deployment_shape: str | None = hosted("deployment_shape")
    deployment_region: str | None = hosted("deployment_region")
    deployment_accelerator_type: str | None = hosted("deployment_accelerator_type")
    hot_load_bucket_type: str | None = hosted("hot_load_bucket_type")
    deployment_timeout_s: float | None = hosted("deployment_timeout_s")
    deployment_extra_args: list[str] | None = hosted("deployment_extra_args")
    disable_speculative_decoding: bool | None = hosted("disable_speculative_decoding")
    extra_values: dict[str, str] | None = hosted("extra_values")
    weight_sync_scope: str | None = hosted("weight_sync_scope")


class HostedWeightSyncFields(BaseModel):
    """The cookbook's ``WeightSyncConfig`` fields about a hosted checkpoint service."""

    dcp_timeout: float | None = hosted("dcp_timeout")
    first_checkpoint_type: str | None = hosted("first_checkpoint_type")
    weight_sync_before_training: bool | None = hosted("weight_sync_before_training")
    weight_sync_timeout: float | None = hosted("weight_sync_timeout")


def hosted_settings(section_name: str, section: BaseModel) -> list[str]:
    """``"<section>.<field> = <value> (<reason>)"`` for each hosted field set in ``section``."""
    return [f"{section_name}.{name} = {getattr(section, name)!r} ({HOSTED_REASONS[name]})"
            for name in type(section).model_fields if name in HOSTED_REASONS and getattr(section, name) is not None]
