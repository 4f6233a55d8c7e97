"""``--set field=value`` and ``RLSTREAM_<FIELD>`` overrides of a config: how their text becomes a
value and where in the config's data it goes. Pure functions of the config model they are
given (``core.config`` passes ``Config``); no torch.
"""
from __future__ import annotations

import tomllib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel

from rlstream.core.errors import ConfigError

ENV_PREFIX = "RLSTREAM_"


def is_text_field(config_model: type[BaseModel], dotted: str) -> bool:
    """True when the field at ``dotted`` is a string field (``run_id = 42`` means "42")."""
    model: Any = config_model
    for part in dotted.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    options = typing.get_args(model) if typing.get_origin(model) in (typing.Union, types.UnionType) else (model,)
    # Annotated[str, ...] (PathText) counts as str
    return any(typing.get_args(o)[0] is str if typing.get_origin(o) is Annotated else o is str for o in options)


def parse_value(config_model: type[BaseModel], text: str, dotted: str = "") -> Any:
    """``--set``/env values are TOML literals when they parse as one, else plain strings;
    a string field keeps the text as given (unless it is a quoted TOML string)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if is_text_field(config_model, dotted) and not isinstance(value, str):
        return text
    return value


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error: {dotted}: {part} is not a table")
    node[leaf] = value


def env_names(config_model: type[BaseModel]) -> dict[str, str]:
    """``RLSTREAM_<FIELD>`` (``RLSTREAM_<TABLE>_<FIELD>`` for tables) -> dotted field."""
    out = {}
    for name, field in config_model.model_fields.items():
        sub = field.annotation if isinstance(field.annotation, type) else None
        if sub is not None and issubclass(sub, BaseModel):
            out |= {f"{ENV_PREFIX}{name}_{inner}".upper(): f"{name}.{inner}" for inner in sub.model_fields}
        else:
            out[f"{ENV_PREFIX}{name}".upper()] = name
    return out


def env_overrides(config_model: type[BaseModel], environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    return [(dotted, parse_value(config_model, environ[key], dotted))
            for key, dotted in env_names(config_model).items() if key in environ]
