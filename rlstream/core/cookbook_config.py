"""The Fireworks cookbook's spellings of a config, so a cookbook ``train.py`` builds its
``Config`` unchanged: ``deployment=DeployConfig(...)``, ``weight_sync=WeightSyncConfig(...)``,
``infra=InfraConfig(...)`` (and ``trainer=TrainerConfig(...)``, ``wandb=WandBConfig(...)``,
which are rlstream's own ``[trainer]`` and ``[wandb]`` tables), in Python or as TOML tables.

One source of truth (docs/design.md §15.60 Cookbook config sections): a nested field that
means something self-hosted is another *spelling* of one of rlstream's fields.
``move_cookbook_spellings`` (run by ``Config`` before it validates) moves its value there
(``weight_sync.weight_sync_interval`` -> ``weight_sync_interval``, ``deployment.replica_count``
-> ``workers.count``, ...) and leaves the nested field None, so the config, config.json and
every reader see one value; a nested and a flat value that disagree are an error naming both.

Hosted-only fields (training shapes, deployment ids, regions, provisioning timeouts) only a
hosted service can honour: they are accepted, stored as written, and reported once by
``rlstream up`` / ``rlstream.main`` as ignored, with the reason (``ignored_settings``).

The dependency runs one way: ``core.config`` composes these tables into ``Config`` (and
``HostedTrainerFields`` into its ``[trainer]`` table); this module imports nothing of
rlstream's and knows rlstream's fields only by the dotted names in ``MOVES``. Only pydantic
here (no torch).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

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


def hosted_settings(section_name: str, section: BaseModel) -> list[str]:
    """``"<section>.<field> = <value> (<reason>)"`` for each hosted field set in ``section``."""
    return [f"{section_name}.{name} = {getattr(section, name)!r} ({HOSTED_REASONS[name]})"
            for name in type(section).model_fields if name in HOSTED_REASONS and getattr(section, name) is not None]


_SKIP = object()  # a nested value that sets nothing (it names the default)


# Every config table's settings, rlstream's own (core.config.ConfigSection) and the cookbook's:
# strict, because TOML has real types, so `seed = true` or `learning_rate = "1e-3"` is a mistake to
# report, not to coerce (`--set` and environment values are parsed as TOML literals first). Defined
# here, the module core.config imports, so that both kinds of table share one definition.
STRICT_TABLE = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class CookbookSection(BaseModel):
    model_config = STRICT_TABLE


class DeployConfig(HostedDeployFields, CookbookSection):
    """The cookbook's ``DeployConfig``: where rollouts are sampled. ``tokenizer_model``,
    ``replica_count`` and ``sample_timeout`` are spellings of rlstream fields; the rest is
    hosted-only."""

    tokenizer_model: str | None = Field(
        None, description="spelling of `tokenizer_model` (naming base_model itself = its own tokenizer, the default)")
    replica_count: int | None = Field(None, ge=0, le=256, description="spelling of `workers.count` (rollout workers)")
    sample_timeout: float | None = Field(None, gt=0, le=3600, description="spelling of `inference.timeout`")


class WeightSyncConfig(HostedWeightSyncFields, CookbookSection):
    """The cookbook's ``WeightSyncConfig``: publish and checkpoint intervals, the reload's bound."""

    weight_sync_interval: int | None = Field(None, ge=0, description="spelling of `weight_sync_interval`")
    dcp_save_interval: int | None = Field(None, ge=0, description="spelling of `dcp_save_interval`")
    max_concurrent: int | None = Field(
        None, ge=0, description="spelling of `max_concurrency_rollout_sample` (0 = unlimited = unset)")
    weight_sync_timeout: float | None = Field(
        None, gt=0, le=86_400, description="spelling of `inference.weight_sync_timeout`")


class InfraConfig(HostedTrainerFields, CookbookSection):
    """The cookbook's ``InfraConfig``: a hosted trainer's shape. Every field is hosted-only."""


def _tokenizer(value: Any, data: dict[str, Any], base_model_default: Any) -> Any:
    value = os.fspath(value) if isinstance(value, os.PathLike) else value
    base = data.get("base_model", base_model_default)
    return _SKIP if value == (os.fspath(base) if isinstance(base, os.PathLike) else base) else value


# (section, field) -> (rlstream's dotted field, conversion of the value or _SKIP)
MOVES: dict[tuple[str, str], tuple[str, Callable[..., Any]]] = {
    ("deployment", "tokenizer_model"): ("tokenizer_model", _tokenizer),
    ("deployment", "replica_count"): ("workers.count", lambda v, *_: v),
    ("deployment", "sample_timeout"): ("inference.timeout", lambda v, *_: v),
    ("weight_sync", "weight_sync_interval"): ("weight_sync_interval", lambda v, *_: v),
    ("weight_sync", "dcp_save_interval"): ("dcp_save_interval", lambda v, *_: v),
    ("weight_sync", "max_concurrent"): ("max_concurrency_rollout_sample", lambda v, *_: v or _SKIP),
    ("weight_sync", "weight_sync_timeout"): ("inference.weight_sync_timeout", lambda v, *_: v),
}


def _as_dict(value: Any) -> Any:
    """A section as the dict of what was given: a model's explicitly set fields, a dict as is."""
    if isinstance(value, BaseModel):
        return {name: getattr(value, name) for name in value.model_fields_set}
    return dict(value) if isinstance(value, dict) else value


def move_cookbook_spellings(data: Any, base_model_default: Any) -> Any:
    """``data`` (a config's input, before validation) with every self-hosted spelling in its
    cookbook tables moved onto rlstream's field (``MOVES``); anything but a dict is returned as
    is (pydantic reports it)."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for (section, name), (dotted, convert) in MOVES.items():
        given = _as_dict(data.get(section))
        if not isinstance(given, dict) or given.get(name) is None:
            continue  # absent (or not a table: pydantic reports that)
        value = convert(given.pop(name), data, base_model_default)
        data[section] = given
        if value is not _SKIP:
            _set_once(data, dotted, value, f"{section}.{name}")
    return data


def _set_once(data: dict[str, Any], dotted: str, value: Any, nested: str) -> None:
    """Put ``value`` at ``dotted``, unless a different value is already there (an error)."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node[part] = node = _as_dict(node.get(part, {}))
        if not isinstance(node, dict):
            return  # pydantic reports the table's type
    if node.get(leaf) is not None and node[leaf] != value:
        raise ValueError(f"{nested} = {value!r} and {dotted} = {node[leaf]!r} disagree, and they are one setting: "
                         f"keep {dotted} (rlstream's name) with the value you mean and drop {nested}")
    node[leaf] = value


def ignored_settings(cfg: Any) -> list[str]:
    """Every hosted-only field the config sets, with the reason it is ignored."""
    return [line for name in ("trainer", "infra", "deployment", "weight_sync")
            for line in hosted_settings(name, getattr(cfg, name))]
