"""The Fireworks cookbook's nested config sections, so a cookbook ``train.py`` builds its
``Config`` unchanged: ``deployment=DeployConfig(...)``, ``weight_sync=WeightSyncConfig(...)``,
``infra=InfraConfig(...)`` (and ``trainer=TrainerConfig(...)``, ``wandb=WandBConfig(...)``,
which are rlstream's own ``[trainer]`` and ``[wandb]`` tables), in Python or as TOML tables.

One source of truth (docs/design.md §15.60 Cookbook config sections): a nested field that
means something self-hosted is another *spelling* of one of rlstream's fields. Validation
moves its value there (``weight_sync.weight_sync_interval`` -> ``weight_sync_interval``,
``deployment.replica_count`` -> ``workers.count``, ...) and leaves the nested field None, so
the config, config.json and every reader see one value; a nested and a flat value that
disagree are an error naming both. Hosted-only fields (shapes, deployment ids) are kept as
written and listed by ``ignored_settings`` (``core.hosted_fields``).
"""
from __future__ import annotations

import os
from typing import Any, Callable

from pydantic import BaseModel, Field, model_validator

from rlstream.core.config_sections import ConfigSection, WandbConfig
from rlstream.core.hosted_fields import HostedDeployFields, HostedTrainerFields, HostedWeightSyncFields, hosted_settings

WandBConfig = WandbConfig  # the cookbook's spelling; one class
_SKIP = object()  # a nested value that sets nothing (it names the default)


class DeployConfig(HostedDeployFields, ConfigSection):
    """The cookbook's ``DeployConfig``: where rollouts are sampled. ``tokenizer_model``,
    ``replica_count`` and ``sample_timeout`` are spellings of rlstream fields; the rest is
    hosted-only."""

    tokenizer_model: str | None = Field(
        None, description="spelling of `tokenizer_model` (naming base_model itself = its own tokenizer, the default)")
    replica_count: int | None = Field(None, ge=0, le=256, description="spelling of `workers.count` (rollout workers)")
    sample_timeout: float | None = Field(None, gt=0, le=3600, description="spelling of `inference.timeout`")


class WeightSyncConfig(HostedWeightSyncFields, ConfigSection):
    """The cookbook's ``WeightSyncConfig``: publish and checkpoint intervals."""

    weight_sync_interval: int | None = Field(None, ge=0, description="spelling of `weight_sync_interval`")
    dcp_save_interval: int | None = Field(None, ge=0, description="spelling of `dcp_save_interval`")
    max_concurrent: int | None = Field(
        None, ge=0, description="spelling of `max_concurrency_rollout_sample` (0 = unlimited = unset)")


class InfraConfig(HostedTrainerFields, ConfigSection):
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
}


def _as_dict(value: Any) -> Any:
    """A section as the dict of what was given: a model's explicitly set fields, a dict as is."""
    if isinstance(value, BaseModel):
        return {name: getattr(value, name) for name in value.model_fields_set}
    return dict(value) if isinstance(value, dict) else value


class CookbookSections(ConfigSection):
    """Config's cookbook tables, and the move of their self-hosted spellings onto rlstream's fields."""

    # frozen: assigning a table to a built Config would skip the move (two copies of one value);
    # set rlstream's own field instead
    deployment: DeployConfig = Field(default_factory=DeployConfig, frozen=True)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig, frozen=True)
    infra: InfraConfig = Field(default_factory=InfraConfig, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _move_cookbook_spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        base_default = cls.model_fields["base_model"].default if "base_model" in cls.model_fields else None
        for (section, name), (dotted, convert) in MOVES.items():
            given = _as_dict(data.get(section))
            if not isinstance(given, dict) or given.get(name) is None:
                continue  # absent (or not a table: pydantic reports that)
            value = convert(given.pop(name), data, base_default)
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
