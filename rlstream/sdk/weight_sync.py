"""``WeightSyncer``: the seed's save-and-hotload helper, ``save_and_hotload(name)`` = seal the
policy's weights as a sampler snapshot and sync the service's deployment to it, so that every
sampler over the deployment (``service.create_deployment_sampler``, or
``DeploymentSampler(inference_url=service.inference_url)``) samples them from the next call.

Self-hosted meanings of the hosted arguments: ``deploy_mgr`` is the ``ServiceClient`` (it plays
the deployment manager: ``inference_url``, ``deployment_id``) or None (the policy client's own
service); ``deployment_id`` and ``base_model`` are checked against the service when given;
``hotload_timeout`` is not needed (a local deployment loads in this process, a server's reload
is bounded by ``inference.weight_sync_timeout``); ``checkpoint_type`` / ``first_checkpoint_type``
("base" or "delta") are accepted, but every snapshot is the full weights, so there is no delta
chain to start or follow.
"""
from __future__ import annotations

import logging
from typing import Any

from rlstream.core.errors import ConfigError, RlstreamError

log = logging.getLogger(__name__)
CHECKPOINT_TYPES = ("base", "delta")


def _check_type(value: str | None, what: str) -> None:
    if value is not None and value not in CHECKPOINT_TYPES:
        raise ValueError(f"{what} must be 'base' or 'delta' (every snapshot here is the full weights), got {value!r}")


class WeightSyncer:
    """``save_and_hotload(name)`` (snapshot + deployment sync; returns the snapshot's identity,
    or None when the sync failed, with a warning, as the seed's does) and ``save_dcp(name)``
    (a train-state checkpoint: ``save_state``)."""

    def __init__(self, policy_client: Any, deploy_mgr: Any = None, deployment_id: str | None = None,
                 base_model: str | None = None, hotload_timeout: float | None = None,
                 first_checkpoint_type: str | None = "base", **hosted: Any):
        session = getattr(policy_client, "session", None)
        if session is None or not hasattr(policy_client, "save_weights_for_sampler"):
            raise TypeError("WeightSyncer(policy_client=...) takes the service's training client "
                            "(service.create_training_client(), or the seed's policy.inner)")
        if deploy_mgr is not None and getattr(deploy_mgr, "session", None) is not session:
            raise TypeError("WeightSyncer(deploy_mgr=...) takes the ServiceClient the policy client belongs to "
                            "(it is rlstream's deployment manager), or None")
        _check_type(first_checkpoint_type, "first_checkpoint_type")
        if base_model is not None and base_model != session.cfg.base_model:
            raise ConfigError(f"WeightSyncer: base_model {base_model!r} is not the service's "
                              f"({session.cfg.base_model!r})")
        if deployment_id is not None and deploy_mgr is not None and deployment_id != deploy_mgr.deployment_id:
            raise ConfigError(f"WeightSyncer: deployment_id {deployment_id!r} is not the service's "
                              f"({deploy_mgr.deployment_id!r}): its one deployment is the one synced")
        if hosted:
            log.info("WeightSyncer: ignoring %s (hosted only)", ", ".join(sorted(hosted)))
        self.policy_client, self.session = policy_client, session
        self.deployment_id, self.hotload_timeout = deployment_id, hotload_timeout
        self.last_saved: str | None = None  # the identity of the newest snapshot saved

    def save_and_hotload(self, name: str, checkpoint_type: str | None = None) -> str | None:
        """Save the policy's weights as sampler snapshot ``name`` and sync the service's
        deployment to it; the snapshot's identity (``rlstream://<run>/sampler_weights/<name>``).
        A sync that fails is logged and answered with None (the snapshot stays saved: sync to it
        later with ``create_deployment_sampler(model_path=...)``)."""
        _check_type(checkpoint_type, "checkpoint_type")
        if self.session.hotload is None:
            raise RlstreamError("this training client belongs to no open service, so it has no deployment to "
                                "hotload: create it with service.create_training_client()")
        path = self.policy_client.save_weights_for_sampler(name).result().path
        self.last_saved = path
        try:
            self.session.hotload(path)
        except RlstreamError as exc:  # the server refused or did not answer (InferenceError, ConfigError...)
            log.warning("hotload of %s failed: %s", path, exc)
            return None
        return path

    def save_dcp(self, name: str) -> str:
        """A train-state checkpoint (weights, AdamW moments, RNG) by name: ``save_state``."""
        return self.policy_client.save_state(name).result().path
