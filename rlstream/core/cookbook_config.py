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

The recipe's own top-level fields beyond those (``lr_scheduler``, ``pipeline_chunks_per_step``,
``grad_accumulation_normalization``, ``weight_sync_timeout``, ``cleanup_on_exit``,
``router_replay``, ``warm_start_from_adapter``...) and ``TrainerConfig.job_id`` follow the
same two rules: a spelling is moved onto rlstream's field (``lr_scheduler`` onto
``lr_schedule`` and ``lr_warmup_steps``, ``pipeline_chunks_per_step`` onto
``trainer.streaming``, ``trainer.job_id`` onto ``run_id``), a hosted-only field is reported.
A value whose meaning rlstream has but cannot give (a warm-up-stable-decay schedule, a warm
start from a PEFT adapter) is an error that says what to do instead, never silently ignored.
The enums cookbook code passes (``GradAccNormalization``, ``WeightSyncScope``) are here too.

The recipe's defaults are here too (``COOKBOOK_DEFAULTS``): ``core.config``'s defaults are the
cookbook's for every field the recipe has, but for a few kept on purpose (``KEPT_DIFFERENCES``,
each with its reason), which ``rlstream up`` / ``rlstream.main`` print once when they apply
(``kept_differences``).

The dependency runs one way: ``core.config`` composes these tables into ``Config`` (and
``HostedTrainerFields`` into its ``[trainer]`` table); this module imports nothing of
rlstream's and knows rlstream's fields only by the dotted names in ``MOVES`` and the moves
below, and their defaults only as ``move_cookbook_spellings`` is given them. Only pydantic
here (no torch).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from enum import Enum, StrEnum
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

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
    "reference_training_shape_id": "the reference model is loaded by the trainer when kl_beta > 0 "
                                   "(reference_model; unset = base_model)",
    "reference_job_id": "the reference is loaded by this run's trainer; there is no reference job to attach to",
    "cleanup_on_exit": "`rlstream up` and `rlstream.main` always stop the processes and the embedded Redis they "
                       "started when the run ends; the run directory stays (the same run id resumes it)",
    "router_replay": "no expert routes are replayed: the trainer's forward routes a mixture-of-experts model "
                     "itself, and the samplers return no routing matrices",
    "router_replay_completion_only": "no expert routes are replayed (see router_replay)",
    "grad_accumulation_normalization": "gradients are never summed unnormalised: each step's loss is reduced as "
                                       "`normalization` says (token_mean, sequence_mean or token_sum)",
}


def hosted(reason_of: str) -> Any:
    """A hosted-only field: None = not set; any value is accepted and ignored."""
    return Field(None, description=f"hosted only, accepted and ignored: {HOSTED_REASONS[reason_of]}")


class HostedTrainerFields(BaseModel):
    """The cookbook's ``InfraConfig`` / ``TrainerConfig`` fields (a hosted trainer's shape): hosted-only, but
    ``accelerator_count`` and ``node_count``, spellings of ``trainer.nproc_per_node`` and ``trainer.nnodes``."""

    training_shape_id: str | None = hosted("training_shape_id")
    ref_training_shape_id: str | None = hosted("ref_training_shape_id")
    region: str | None = hosted("region")
    custom_image_tag: str | None = hosted("custom_image_tag")
    accelerator_type: str | None = hosted("accelerator_type")
    accelerator_count: int | None = Field(
        None, ge=1, le=1024, description="spelling of `trainer.nproc_per_node` (trainer ranks per node)")
    node_count: int | None = Field(None, ge=1, le=4096, description="spelling of `trainer.nnodes`")
    trainer_timeout_s: float | None = hosted("trainer_timeout_s")
    extra_args: list[str] | None = hosted("extra_args")
    reference_training_shape_id: str | None = hosted("reference_training_shape_id")
    reference_job_id: str | None = hosted("reference_job_id")


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
    weight_sync_scope: WeightSyncScope | str | None = hosted("weight_sync_scope")


class HostedWeightSyncFields(BaseModel):
    """The cookbook's ``WeightSyncConfig`` fields about a hosted checkpoint service."""

    dcp_timeout: float | None = hosted("dcp_timeout")
    first_checkpoint_type: str | None = hosted("first_checkpoint_type")
    weight_sync_before_training: bool | None = hosted("weight_sync_before_training")


def hosted_settings(section_name: str, section: BaseModel) -> list[str]:
    """``"<section>.<field> = <value> (<reason>)"`` for each hosted field set in ``section``
    (``section_name`` "": the config's top-level fields, ``"<field> = ..."``)."""
    prefix = f"{section_name}." if section_name else ""
    return [f"{prefix}{name} = {_plain(getattr(section, name))!r} ({HOSTED_REASONS[name]})"
            for name in type(section).model_fields if name in HOSTED_REASONS and getattr(section, name) is not None]


def _plain(value: Any) -> Any:
    """An enum member as the value it stands for (``WeightSyncScope.PER_TRAINER`` -> its string)."""
    return value.value if isinstance(value, Enum) else value


class GradAccNormalization(StrEnum):
    """The cookbook's ``grad_accumulation_normalization`` values: ``NUM_LOSS_TOKENS`` and
    ``NUM_SEQUENCES`` are rlstream's ``normalization`` ``token_mean`` and ``sequence_mean``;
    ``NONE`` (gradients summed as they are) has no equivalent and is reported as ignored."""

    NUM_LOSS_TOKENS = "num_loss_tokens"
    NUM_SEQUENCES = "num_sequences"
    NONE = "none"


class WeightSyncScope(StrEnum):
    """The cookbook's ``DeployConfig.weight_sync_scope``: which bucket a hosted deployment pulls
    weights from. Here weights are files under the run directory that the workers (or the
    SDK's deployment) load, so both values mean the same and the field is reported as ignored."""

    PER_TRAINER = "per_trainer"
    PER_DEPLOYMENT = "per_deployment"


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
    """The cookbook's ``InfraConfig``: a hosted trainer's shape. Every field is hosted-only but
    ``accelerator_count`` and ``node_count`` (the trainer's ranks per node and nodes)."""


class _Schedule(CookbookSection):
    """A cookbook learning-rate schedule (``lr_scheduler=CosineSchedule(warmup_steps=10)``):
    linear warmup, then the schedule's shape. rlstream's ``lr_schedule`` decays to 0 at
    ``max_steps`` after ``lr_warmup_steps``; the knobs it has no equivalent for must stay at
    their defaults (an error says so), since they would change the learning rate."""

    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="spelling of `lr_warmup_steps`")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="not supported: give warmup_steps")
    decay_ratio: float | None = Field(None, ge=0, le=1, description="not supported: decay runs from the end of "
                                      "warmup to max_steps (None or 1)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="not supported: decay ends at 0")


class ConstantSchedule(_Schedule):
    type: Literal["constant"] = "constant"


class LinearSchedule(_Schedule):
    type: Literal["linear"] = "linear"


class CosineSchedule(_Schedule):
    type: Literal["cosine"] = "cosine"


class WSDSchedule(_Schedule):
    """Warmup-stable-decay: accepted as a spelling so that the error can name it; rlstream has no
    such schedule."""

    type: Literal["wsd"] = "wsd"
    decay_ratio: float | None = Field(0.1, ge=0, le=1, description="not supported")
    decay_type: Literal["linear", "cosine", "sqrt"] = "linear"


LRSchedulerSpec = Annotated[Union[ConstantSchedule, LinearSchedule, CosineSchedule, WSDSchedule],
                            Field(discriminator="type")]
_SCHEDULES: TypeAdapter[Any] = TypeAdapter(LRSchedulerSpec)


def default_constant_schedule() -> ConstantSchedule:
    """The cookbook's default ``lr_scheduler``: constant, no warmup (= rlstream's defaults)."""
    return ConstantSchedule()


def _schedule_fields(value: Any) -> dict[str, Any]:
    """``lr_scheduler`` (a schedule, or its dict) as rlstream's ``lr_schedule`` and
    ``lr_warmup_steps``; nothing for the default constant schedule; a ValueError for what
    rlstream cannot do."""
    try:
        raw = value.model_dump() if isinstance(value, BaseModel) else value  # any schedule model, with its type
        spec = value if isinstance(value, _Schedule) else _SCHEDULES.validate_python(raw)
    except ValidationError as exc:
        raise ValueError("lr_scheduler: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                      for e in exc.errors())) from None
    unsupported = []
    if spec.type == "wsd":
        unsupported.append("type 'wsd' (warmup-stable-decay)")
    if spec.warmup_ratio is not None:
        unsupported.append(f"warmup_ratio = {spec.warmup_ratio} (give warmup_steps)")
    if spec.decay_ratio not in (None, 1.0) and spec.type != "wsd":
        unsupported.append(f"decay_ratio = {spec.decay_ratio}")
    if spec.min_lr_ratio:
        unsupported.append(f"min_lr_ratio = {spec.min_lr_ratio}")
    if unsupported:
        raise ValueError(f"lr_scheduler: {', '.join(unsupported)} has no rlstream equivalent, and ignoring it would "
                         "change the learning rate: rlstream's lr_schedule is constant, linear or cosine, with "
                         "lr_warmup_steps of linear warmup and a decay to 0 at max_steps")
    if spec == ConstantSchedule():
        return {}
    return {"lr_schedule": spec.type, "lr_warmup_steps": spec.warmup_steps}


# grad_accumulation_normalization -> rlstream's normalization ("none" has none: it stays, reported)
_NORMALIZATIONS = {"num_loss_tokens": "token_mean", "num_sequences": "sequence_mean"}


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
    ("trainer", "job_id"): ("run_id", lambda v, *_: v),  # reattaching to a trainer job = continuing the run
    # a trainer's accelerators and nodes: its ranks under torchrun (docs/scaling-trainer.md)
    ("trainer", "accelerator_count"): ("trainer.nproc_per_node", lambda v, *_: v),
    ("trainer", "node_count"): ("trainer.nnodes", lambda v, *_: v),
    ("infra", "accelerator_count"): ("trainer.nproc_per_node", lambda v, *_: v),
    ("infra", "node_count"): ("trainer.nnodes", lambda v, *_: v),
}
# top-level recipe field -> (rlstream's dotted field, conversion of the value or _SKIP)
TOP_LEVEL_MOVES: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "weight_sync_timeout": ("inference.weight_sync_timeout", lambda v: v),
    "grad_accumulation_normalization": ("normalization", lambda v: _NORMALIZATIONS.get(_plain(v), _SKIP)),
}


def _as_dict(value: Any) -> Any:
    """A section as the dict of what was given: a model's explicitly set fields, a dict as is."""
    if isinstance(value, BaseModel):
        return {name: getattr(value, name) for name in value.model_fields_set}
    return dict(value) if isinstance(value, dict) else value


def move_cookbook_spellings(data: Any, defaults: Mapping[str, Any]) -> Any:
    """``data`` (a config's input, before validation) with every self-hosted spelling in its
    cookbook tables and top-level recipe fields moved onto rlstream's field (``MOVES``,
    ``TOP_LEVEL_MOVES``, ``lr_scheduler``, ``pipeline_chunks_per_step``); anything but a dict is
    returned as is (pydantic reports it). ``defaults``: rlstream's defaults of ``base_model``,
    ``prompt_groups_per_step``, ``completions_per_prompt`` and ``max_seq_len`` (None = no limit:
    ``max_seq_len_limit``), for the values a move derives from them."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    for (section, name), (dotted, convert) in MOVES.items():
        given = _as_dict(data.get(section))
        if not isinstance(given, dict) or given.get(name) is None:
            continue  # absent (or not a table: pydantic reports that)
        value = convert(given.pop(name), data, defaults["base_model"])
        data[section] = given
        if value is not _SKIP:
            _set_once(data, dotted, value, f"{section}.{name}")
    for name, (dotted, convert) in TOP_LEVEL_MOVES.items():
        if data.get(name) is None:
            continue
        value = convert(data[name])
        if value is not _SKIP:
            data[name] = None
            _set_once(data, dotted, value, name)
        else:
            data[name] = _plain(data[name])  # kept as written (an enum as its value), reported as ignored
    if data.get("lr_scheduler") is not None:
        for dotted, value in _schedule_fields(data.pop("lr_scheduler")).items():
            spelled = "lr_scheduler.type" if dotted == "lr_schedule" else "lr_scheduler.warmup_steps"
            _set_once(data, dotted, value, spelled)
    _move_pipeline_chunks(data, defaults)
    return data


def _move_pipeline_chunks(data: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """``pipeline_chunks_per_step = N > 1`` (the cookbook sends a step's groups to the trainer
    in N chunks as they fill) is ``trainer.streaming``: forward/backward on groups as they
    arrive. rlstream sizes those chunks in padded tokens (``trainer.micro_batch_tokens``): unset,
    a chunk holds at most ceil(B / N) rows of ``max_seq_len`` tokens (more when shorter)."""
    chunks = data.get("pipeline_chunks_per_step")
    if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
        return  # absent, or wrong: pydantic reports that
    data["pipeline_chunks_per_step"] = None
    if chunks == 1:
        return  # the whole batch at once: rlstream's default
    trainer = _as_dict(data.get("trainer", {}))
    if not isinstance(trainer, dict):
        return
    if trainer.get("streaming") is False:
        raise ValueError(f"pipeline_chunks_per_step = {chunks} streams the batch to the trainer in chunks, which is "
                         "trainer.streaming, and trainer.streaming = false: keep one (rlstream's name is "
                         "trainer.streaming)")
    trainer["streaming"] = True
    if trainer.get("micro_batch_tokens") is None:
        sizes = [data.get(k, defaults[k]) for k in ("prompt_groups_per_step", "completions_per_prompt")]
        length = data.get("max_seq_len", defaults["max_seq_len"])
        length = defaults["max_seq_len_limit"] if length is None else length
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (*sizes, length)):
            trainer["micro_batch_tokens"] = math.ceil(sizes[0] * sizes[1] / chunks) * length
    data["trainer"] = trainer


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


# The cookbook recipe's defaults (the rl_loop Config of fw-ai/cookbook's training/recipes/rl_loop.py
# and the seeds: WeightSyncConfig's intervals, async_rl_loop's gate, the optimizer's DEFAULT_ADAM),
# by rlstream's dotted field. rlstream's own defaults equal these (a test holds them equal), except
# the fields of KEPT_DIFFERENCES. Only fields a cookbook Config has (or, for AdamW, its recipe
# passes) are here: rlstream's others have no cookbook default to follow.
COOKBOOK_GSM8K = "https://raw.githubusercontent.com/eval-protocol/python-sdk/main/development/gsm8k_sample.jsonl"
COOKBOOK_DEFAULTS: dict[str, Any] = {
    "base_model": "accounts/fireworks/models/qwen3-8b",
    "dataset": COOKBOOK_GSM8K,
    "learning_rate": 1e-5,
    "kl_beta": 0.001,
    "completions_per_prompt": 4,
    "max_completion_tokens": 1024,
    "temperature": 1.0,
    "epochs": 1,
    "max_rows": 100,
    "max_seq_len": None,
    "lora_rank": 0,
    "prompt_groups_per_step": 1,
    "policy_loss": "grpo",
    "eps_clip": 0.2,
    "eps_clip_high": None,
    "init_from_checkpoint": None,
    "output_model_id": None,
    "normalization": "token_mean",  # grad_accumulation_normalization = NUM_LOSS_TOKENS
    "lr_schedule": "constant",  # lr_scheduler = ConstantSchedule()
    "lr_warmup_steps": 0,
    "max_head_offpolicy_versions": 0,
    "synchronous_training": False,
    "weight_sync_interval": 1,
    "dcp_save_interval": 0,
    "trainer.beta1": 0.9,
    "trainer.beta2": 0.999,
    "trainer.eps": 1e-8,
    "trainer.weight_decay": 0.01,
    "grad_clip_norm": 1.0,
}

# rlstream defaults that differ from the cookbook's on purpose: field -> why. `rlstream up` and
# `rlstream.main` print the ones in effect once, beside the cookbook's value (kept_differences);
# docs/design.md §15.78 The cookbook's defaults.
KEPT_DIFFERENCES: dict[str, str] = {
    "base_model": "nothing is downloaded: a hosted model name means nothing here, so the default is the model built "
                  "in code; set a local HF model directory",
    "dataset": "nothing is downloaded: unset is the built-in a+b task; set a local JSONL file (or pass rows=)",
    "max_seq_len": "the cookbook's None takes a training shape's context length, and there are no shapes here: "
                   "2048 bounds a sample's prompt + completion (set your model's context length)",
    "dcp_save_interval": "durability: a train-state checkpoint every 50 steps, so a crash costs at most 50 steps "
                         "(the cookbook saves only at the end), and each checkpoint lets the archive trim Redis",
    "trainer.beta2": "docs/design.md §15.41 AdamW's defaults stay (0.9, 0.95): a second moment that follows the "
                     "RL gradient's moving scale; every benchmark was measured with it",
}


def _field_default(model: type[BaseModel], dotted: str) -> Any:
    """The default of the field at ``dotted`` in ``model`` (tables walked by their types)."""
    *tables, leaf = dotted.split(".")
    for name in tables:
        model = model.model_fields[name].annotation
    return model.model_fields[leaf].get_default(call_default_factory=True)


def _value(cfg: BaseModel, dotted: str) -> Any:
    for name in dotted.split("."):
        cfg = getattr(cfg, name)
    return cfg


def kept_differences(cfg: BaseModel) -> list[str]:
    """``"<field> = <rlstream's default> (cookbook: <its default>): <why>"`` for each field of
    ``KEPT_DIFFERENCES`` that holds rlstream's default, i.e. where the run does what the
    cookbook would not (a value the config sets itself is its author's, and not listed)."""
    out = []
    for dotted, why in KEPT_DIFFERENCES.items():
        value = _value(cfg, dotted)
        if value == _field_default(type(cfg), dotted) and value != COOKBOOK_DEFAULTS[dotted]:
            out.append(f"{dotted} = {value!r} (cookbook: {COOKBOOK_DEFAULTS[dotted]!r}): {why}")
    return out


def ignored_settings(cfg: Any) -> list[str]:
    """Every hosted-only field the config sets, with the reason it is ignored."""
    return hosted_settings("", cfg) + [line for name in ("trainer", "infra", "deployment", "weight_sync")
                                       for line in hosted_settings(name, getattr(cfg, name))]
