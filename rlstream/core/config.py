"""The run configuration: one pydantic model, ``Config``, with its tables, loaded from TOML (or
the resolved JSON a run writes), then overridden by ``RLSTREAM_<FIELD>`` environment variables,
then by ``--set field=value``. Field names follow the Fireworks cookbook's recipe Config, and so
do the defaults of the fields it has (but those ``core.cookbook_config.KEPT_DIFFERENCES`` keeps,
with its reasons); the cookbook's nested spellings and hosted-only fields are
``core.cookbook_config``'s, which ``Config`` composes (its ``deployment``, ``weight_sync`` and
``infra`` tables) and runs before it validates.

In order: the closed sets of names a field chooses from, the tables (``[redis]``, ``[tis]``,
``[wandb]``, ``[workers]``, ``[trainer]``, ``[inference]``, ``[retention]``), ``Config``, and how a
file, the environment and ``--set`` become one.

This module imports neither torch nor transformers: the CLI validates a config and
reports a bad one before any heavy import.
"""
from __future__ import annotations

import json
import math
import os
import tomllib
import types
import typing
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    Field,
    SerializationInfo,
    ValidationError,
    field_serializer,
    model_validator,
)

from rlstream.core.cookbook_config import (
    STRICT_TABLE,
    DeployConfig,
    GradAccNormalization,
    HostedTrainerFields,
    InfraConfig,
    LRSchedulerSpec,
    WeightSyncConfig,
    hosted,
    move_cookbook_spellings,
)
from rlstream.core.credentials import redacted, without_password
from rlstream.core.errors import ConfigError
from rlstream.core.imports import check_spec
from rlstream.core.keys import check_run_id

# --------------------------------------------------------------------------- the closed name sets

# The closed sets of names a config field chooses from, each written once: the config validates
# against it, and the code that implements each name (the trainer's losses and advantages, the
# built-in rewards, preflight) imports it from here. A set whose field admits nothing else is a
# ``Literal`` type (pydantic validates and reports it, type checkers see it), with its names as a
# tuple beside it for code that checks at run time; ``advantage`` and ``reward_fn`` also take a
# ``'module:function'``, so theirs is a plain tuple.
PolicyLoss = Literal["grpo", "importance_sampling", "reinforce", "dapo", "dro", "gspo", "cispo"]
POLICY_LOSSES: tuple[str, ...] = get_args(PolicyLoss)

KlEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KlEstimator)

Normalization = Literal["token_mean", "sequence_mean", "token_sum"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)

IgpoNormalization = Literal["joint", "mean", "separate"]
IGPO_NORMALIZATIONS: tuple[str, ...] = get_args(IgpoNormalization)

TisLevel = Literal["token", "sequence"]  # only the config (and the losses' types) need it as names
LrSchedule = Literal["constant", "linear", "cosine"]  # likewise
TrainerDtype = Literal["float32", "bfloat16", "float16"]  # likewise

# grpo: (r - mean) / std; dr_grpo: r - mean (functions of a group's rewards). igpo: turn-level
# information gains, one advantage per token, computed by the trainer with its policy (trainer/igpo.py).
# Anything else is a 'module:function'.
ADVANTAGE_METHODS: tuple[str, ...] = ("grpo", "dr_grpo")
TOKEN_ADVANTAGE_METHODS: tuple[str, ...] = ("igpo",)
# rlstream.builtin.rewards implements each. Anything else is a 'module:function'.
BUILTIN_REWARDS: tuple[str, ...] = ("exact_match", "math_answer")


# --------------------------------------------------------------------------- the tables
class ConfigSection(BaseModel):
    model_config = STRICT_TABLE  # strict, no unknown fields (core.cookbook_config says why)


class RedisConfig(ConfigSection):
    url: str | None = Field(
        None, pattern=r"^(redis|rediss|unix)://",
        description="redis://, rediss:// (TLS) or unix:// URL of an external server, with a user name for an ACL "
        "user (redis://USER@host:6379/0); the password goes in RLSTREAM_REDIS_PASSWORD. Unset = `rlstream up` "
        "starts an embedded redis-server (AOF on, random password) under the run directory",
        repr=False,  # may carry a password
    )
    connect_timeout: float = Field(
        15.0, gt=0, le=600, description="seconds of bounded, backed-off retries before giving up"
    )
    maxmemory_mb: int | None = Field(
        None, ge=0, le=1 << 30, description="the embedded server's maxmemory in MiB (noeviction); unset = half the "
        "machine's memory, 0 = no limit. An external server's own maxmemory is read instead"
    )

    @field_serializer("url")
    def _url_without_password(self, url: str | None, info: SerializationInfo) -> str | None:
        """Every dump (config.json, the RunStarted event, W&B) drops the password; only an
        in-process round trip asks for it with ``context={"secrets": True}``."""
        return url if (info.context or {}).get("secrets") else without_password(url)


class TisConfig(ConfigSection):
    """Truncated importance sampling between the trainer's and the sampler's logprobs."""

    cap: float = Field(5.0, ge=1.0, le=1e6, description="cap on the train/inference weight exp(old - inf)")
    level: TisLevel = Field(
        "token", description="weight per token, or the geometric mean over the sequence's trained tokens"
    )
    icepop_threshold: float | None = Field(
        None, gt=1.0, description="zero tokens whose ratio leaves [1/θ, θ] (IcePop); unset = off"
    )


class WandbConfig(ConfigSection):
    """Optional Weights & Biases logging from the trainer (needs `pip install wandb`)."""

    project: str | None = Field(None, description="W&B project; unset = no W&B logging")
    entity: str | None = Field(None, description="W&B entity (team or user); unset = your default entity")
    name: str | None = Field(None, validation_alias=AliasChoices("name", "run_name"),
                             description="W&B run name (the cookbook's `run_name` is accepted); unset = the run id")
    mode: Literal["online", "offline"] = Field("offline", description="W&B mode")


DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?|mps)$"


class WorkersConfig(ConfigSection):
    count: int = Field(2, ge=0, le=256, description="rollout worker processes `rlstream up` starts")
    device: str | None = Field(
        None, pattern=DEVICE_PATTERN, description="the workers' torch device (local backend); unset = the top-level "
        "`device`"
    )
    concurrency_control: Literal["fixed", "adaptive"] = Field(
        "adaptive", description="openai backend: requests in flight per worker adapt to the server's latency and "
        "429/503 answers between 1 and `inference.max_concurrency`, starting at min(16, it) (adaptive, AIMD: an "
        "overloaded server sees few refusals), or stay at `inference.max_concurrency` (fixed, for a server whose "
        "capacity is known and yours alone); a worker takes more groups while the window has room"
    )
    groups_per_job: int | None = Field(
        None, ge=1, le=4096, description="most prompt groups one rq job carries: a worker samples them together (the "
        "local backend in as few `generate` calls as local_max_batch allows) and records them in one MULTI, so rq's "
        "per-job cost is shared; `job_timeout` bounds the whole job; unset = prompt_groups_per_step / count for the "
        "local backend, 1 for remote ones (whose groups then finish one by one instead of with the job's slowest)"
    )
    local_max_batch: int | None = Field(
        None, ge=1, le=65536, description="local backend: most rows one `generate` holds (a job's groups are split "
        "over several calls above it); set, a worker also holds up to local_max_batch / completions_per_prompt "
        "groups of several jobs at once; unset = as many rows of max_seq_len (or max_completion_tokens) tokens as "
        "fit 8192 tokens, at least one group, and one job at a time"
    )
    shared_prefix: bool = Field(
        False, description="local backend: each distinct prompt of a `generate` call prefilled once, its key/value "
        "cache repeated to its completions' rows (a group's G draws share their prompt); the draws are the plain "
        "`generate`'s to float rounding of their logits. transformers causal LMs only"
    )
    max_groups_held: int | None = Field(
        None, ge=1, le=4096, description="most rq jobs a worker holds at once, drawing or being "
        "recorded, while it keeps its request window full (a group waiting on a slow request holds one request of "
        "the window, so more groups than window / completions_per_prompt may be held); unset = the window's size in "
        "requests (`inference.max_concurrency`, or `local_max_batch`)"
    )


class TrainerConfig(ConfigSection, HostedTrainerFields):  # + the cookbook's hosted-only shape fields
    """How the trainer runs a step: micro-batches, precision, device, AdamW (docs/design.md §12
    Algorithm). None of it changes the optimizer step but ``dtype`` and the AdamW parameters."""

    micro_batch_tokens: int | None = Field(
        None, ge=1, le=1 << 40, description="most padded tokens (rows x longest row) one forward/backward holds; "
        "gradients accumulate to the same step; unset = the whole (mini)batch at once"
    )
    dtype: TrainerDtype = Field(
        "float32", description="compute dtype of the trainer's forwards and backwards (autocast); weights and "
        "AdamW state stay float32"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward instead of keeping them"
    )
    shared_prefix: bool = Field(
        False, description="compute a micro-batch's shared prompts once: the rows' tokens up to the first trained "
        "one, once per distinct prefix, its key/value cache repeated to the rows that share it (a group's G "
        "completions share their prompt); the same logprobs and gradient to float rounding. transformers causal "
        "LMs only; not under gradient_checkpointing nor across several trainer ranks (the plain forward then)"
    )
    device: str | None = Field(
        None, pattern=DEVICE_PATTERN, description="the trainer's torch device; unset = the top-level `device`"
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2 (the cookbook's seeds pass 0.999)")
    eps: float = Field(1e-8, gt=0, le=1, description="AdamW eps")
    weight_decay: float = Field(0.01, ge=0, le=10, description="AdamW decoupled weight decay, on every weight")
    streaming: bool = Field(
        False, description="forward/backward on a batch's groups as they arrive, one optimizer step when it is "
        "complete (the cookbook's pipeline chunks); needs micro_batch_tokens and ppo_n_minibatches = 1"
    )
    straggler_wait: float = Field(
        1.0, ge=0, le=100, description="how long the trainer, with a batch ready, still waits for groups being "
        "sampled that this step is the last one allowed to train (admitted O + 1 versions ago: the next step would "
        "drop them as stale), in units of its previous step's time; they train in the batch in place of younger "
        "groups. 0 = never wait (drop them)"
    )
    weight_writer: Literal["thread", "process"] = Field(
        "thread", description="who writes each synced version's files beside the next step: a thread of the "
        "trainer (thread), or a process of its own fed through shared memory (process: the step runs ~3 ms less "
        "slowed by it on 2 cores; needs /dev/shm room for one copy of the weights, else the thread does it)"
    )
    job_id: str | None = Field(
        None, description="spelling of `run_id` (the cookbook's trainer job to reattach to: the same run id "
        "continues that run)"
    )
    # The trainer's ranks (docs/scaling-trainer.md; docs/design.md §15.82 Rank 0 speaks for the trainer's ranks)
    nproc_per_node: int = Field(
        1, ge=1, le=1024, description="trainer ranks (processes) on each node: above 1 (or nnodes above 1) the "
        "trainer runs under torchrun, FSDP2 data parallel, one rank per GPU on CUDA; 1 = one process (the "
        "cookbook's accelerator_count)"
    )
    nnodes: int = Field(
        1, ge=1, le=4096, description="machines the trainer spans, each running `rlstream trainer` with this "
        "config; above 1 needs rdzv_endpoint (the cookbook's node_count)"
    )
    rdzv_endpoint: str | None = Field(
        None, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$", description="host:port where the "
        "nodes' torchrun agents meet (torchrun --rdzv-endpoint; with node_rank, node 0's address for "
        "--master-addr/--master-port); needed when nnodes > 1"
    )
    rdzv_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]{1,128}$", description="torchrun --rdzv-id, the same on every node of one "
        "trainer; unset = the run id"
    )
    node_rank: int | None = Field(
        None, ge=0, le=4095, description="this node's place (0 .. nnodes - 1) in a static rendezvous: node 0 holds "
        "rank 0, which speaks to Redis; unset = torchrun's c10d rendezvous assigns the nodes' places"
    )
    collective_timeout: float = Field(
        600.0, gt=0, le=86_400, description="seconds a collective of the step (a gather, a reduction, a checkpoint) "
        "may wait for the other ranks; then the trainer's ranks stop with the reason and `rlstream up` restarts "
        "them"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        if self.streaming and self.micro_batch_tokens is None:
            raise ValueError("streaming runs the batch in micro-batches as its groups arrive: set micro_batch_tokens")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"nnodes = {self.nnodes}: set rdzv_endpoint (host:port) where the nodes' torchrun "
                             "agents meet")
        if self.node_rank is not None and self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank = {self.node_rank} is not below nnodes = {self.nnodes}")
        return self

    @property
    def world_size(self) -> int:
        """Trainer ranks in all: ``nproc_per_node`` on each of ``nnodes`` nodes."""
        return self.nproc_per_node * self.nnodes


# Path fields take a pathlib.Path from Python too (the config is otherwise strict).
PathText = Annotated[str, BeforeValidator(lambda v: os.fspath(v) if isinstance(v, os.PathLike) else v)]
ServerUrl = Annotated[str, Field(pattern=r"^https?://")]
# Engines that reload weights from a directory through their own HTTP routes, and can be launched
# (rlstream.sampling.engines, rlstream.engine_launch); "openai" is any other OpenAI-compatible server.
ENGINES = ("vllm", "sglang")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class InferenceConfig(ConfigSection):
    """Where workers sample: the local transformers model, or inference servers over HTTP
    (docs/inference-engines.md)."""

    backend: Literal["local", "openai", "vllm", "sglang"] = Field(
        "local", description="local = a transformers model in each worker; vllm / sglang = those servers, synced "
        "through their own weight-reload routes; openai = any other OpenAI-compatible server (synced by POSTing "
        "weight_sync_url, or never)"
    )
    base_url: ServerUrl | list[ServerUrl] | None = Field(
        None, description="the server's API root, e.g. http://127.0.0.1:8000/v1, or a list of replicas: each worker "
        "samples from one, every one is synced, a dead one is skipped and retried"
    )
    model: str | None = Field(None, description="model name sent with each request; unset = base_model")
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding a bearer token (the key itself never goes in a config file)",
    )
    weight_sync_url: str | None = Field(
        None, pattern=r"^https?://", description="openai backend: POSTed {model_path, version} for each new "
        "version; unset = the server is never updated (vllm and sglang are synced through their own routes)"
    )
    weight_sync_timeout: float = Field(
        600.0, gt=0, le=86_400, description="seconds one server may take to load a new version, retries "
        "included; then the worker reports the reload as failed (the cookbook's weight_sync.weight_sync_timeout)"
    )
    timeout: float = Field(120.0, gt=0, le=3600, description="seconds per HTTP request")
    max_retries: int = Field(4, ge=0, le=20, description="retries of a request on timeouts, 408 and 5xx "
                             "but 503 (exponential backoff from 0.5 s, capped at 8 s), and on a server's second "
                             "and later requests dropped in a row while it was believed up; a server that does "
                             "not answer or answers 429/503 is waited for instead, up to `start_timeout`")
    max_concurrency: int = Field(64, ge=1, le=4096, description="completions in flight per worker, across the "
                                 "groups it samples at once (a request of n completions counts n)")
    merge_requests: bool = Field(
        False, description="send the draws of one prompt with the same sampling arguments that start in the same "
        "event-loop pass (a group's G single-sample rollouts) as one request with n = their number: the server "
        "prefills the prompt once and answers once (5x the samples/s of vLLM on CPU with one-token completions). "
        "The request then holds its G completions of the window until its slowest is done: off (each draw its own "
        "request) wins when completion lengths vary widely (docs/design.md §15.74 One request per group)")
    launch: bool = Field(
        False, description="vllm / sglang: `rlstream up` starts one server per base_url (which must be on this "
        "machine), waits for its health, restarts it when it dies and stops it with the run; off = the servers "
        "are yours (another machine, a shared pool)"
    )
    engine_python: PathText | None = Field(
        None, description="launch: the Python interpreter that has the engine installed (e.g. a separate venv "
        "with vllm); unset = the one running rlstream"
    )
    engine_args: list[str] = Field(
        default_factory=list, max_length=256, description="launch: extra command-line flags for the engine "
        "(e.g. [\"--gpu-memory-utilization\", \"0.5\"]); rlstream adds the ones it needs itself"
    )
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="launch: extra environment variables for the engine (e.g. "
        "CUDA_VISIBLE_DEVICES, VLLM_CPU_KVCACHE_SPACE)"
    )
    start_timeout: float = Field(
        900.0, gt=0, le=86_400, description="seconds a server may take to come up: `up` waits this long for "
        "its health after each start, a worker this long for a server that stopped answering or keeps "
        "answering 429/503"
    )

    @property
    def remote(self) -> bool:
        """Sampling happens on servers over HTTP (every backend but local)."""
        return self.backend != "local"

    @property
    def base_urls(self) -> list[str]:
        """Every server, in the order given (none for the local backend)."""
        if self.base_url is None:
            return []
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)

    @model_validator(mode="after")
    def _check(self) -> InferenceConfig:
        remote = self.backend != "local"
        if remote and not self.base_urls:
            raise ValueError(f"backend {self.backend!r} needs base_url (e.g. http://127.0.0.1:8000/v1)")
        if len(set(self.base_urls)) != len(self.base_urls):
            raise ValueError("base_url lists the same server twice: give each replica once")
        if self.weight_sync_url is not None and self.backend != "openai":
            raise ValueError(f"weight_sync_url is for backend 'openai'; backend {self.backend!r} "
                             + ("samples in the worker and needs no sync: drop weight_sync_url" if not remote else
                                "is synced through its own routes: drop weight_sync_url"))
        if self.weight_sync_url is not None and len(self.base_urls) > 1:
            raise ValueError("one weight_sync_url cannot sync several servers: use backend 'vllm' or 'sglang' "
                             "(each server is synced through its own routes), or a single base_url")
        if self.launch and self.backend not in ENGINES:
            raise ValueError(f"launch = true starts vllm or sglang; backend {self.backend!r} has no server rlstream "
                             "knows how to start: set backend = \"vllm\" or \"sglang\", or launch = false")
        return self


class RetentionConfig(ConfigSection):
    """What a long run keeps in Redis and on disk (docs/design.md §15.45 Archive, then trim)."""

    archive: bool = Field(
        True, description="after each checkpoint, move the rollouts it covers out of Redis into "
        "runs/<run>/archive/ and trim the stream; off = the stream keeps every sample (Redis grows with the run)"
    )
    keep_checkpoints: int = Field(
        3, ge=0, le=1_000_000, description="checkpoints kept on disk: the newest N plus any pinned with a "
        "checkpoints/step-<N>.keep file; 0 = keep all"
    )
    memory_high_water: float = Field(
        0.8, gt=0, le=1, description="fraction of Redis's maxmemory at which the producer stops admitting and the "
        "trainer checkpoints (archive + trim) early"
    )


class MetricsConfig(ConfigSection):
    """The run's Prometheus exporter (docs/operating.md): one per run, served by `rlstream up`."""

    port: int | None = Field(
        None, ge=0, le=65_535, description="port `rlstream up` serves the run's Prometheus metrics on (/metrics); "
        "unset = no exporter (two runs on one host would fight over a fixed default, and a port nobody asked for "
        "stays closed); 0 = any free port (logged). `rlstream metrics RUN` serves a run started role by role"
    )
    host: str = Field(
        "127.0.0.1", min_length=1, max_length=255,
        description="address the exporter binds; 0.0.0.0 lets a Prometheus on another host scrape it",
    )


# --------------------------------------------------------------------------- the run
BUILTIN_MODEL = "builtin:tiny"
# The models built in code (rlstream/builtin/tiny_model.py): the default, and the same model with
# one head of size 64, which vLLM's CPU attention accepts (it refuses the default's head size 16).
BUILTIN_MODELS = (BUILTIN_MODEL, "builtin:tiny-h64")
BUILTIN_POSITIONS = 128  # both built-in models' max_position_embeddings
MAX_SEQ_LEN_LIMIT = 1_048_576
# A module name (or dotted suffix) peft matches against the model's modules.
LoraModuleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.]{0,199}$")]
LoraTargets = Literal["all-linear"] | Annotated[list[LoraModuleName], Field(min_length=1, max_length=256)]


class Config(ConfigSection):
    """A run. Every field has a type, a range and a description (docs/configuration.md, generated from this model)."""

    run_id: str | None = Field(None, description="run id; generated by `rlstream up` when unset")
    log_path: PathText = Field("runs", description="directory that holds one sub-directory per run")
    base_model: PathText = Field(
        BUILTIN_MODEL, description="local HF model directory, or `builtin:tiny` (built in code); "
        "`builtin:tiny-h64` is the same with one head of size 64, which vLLM's CPU attention accepts"
    )
    tokenizer_model: PathText | None = Field(None, description="tokenizer directory; unset = base_model's")
    dataset: PathText | None = Field(
        None, description="JSONL dataset path (rows with prompt, messages or prompt_token_ids; with a "
        "rollout_fn_factory, any JSON object); unset = built-in task"
    )
    rollout_fn_factory: str | None = Field(
        None, description="'module:function' returning rollout_fn; unset = the built-in single-turn rollout"
    )
    reward_fn: str = Field(
        "exact_match", description="built-in rollout's reward: exact_match, math_answer or 'module:function'"
    )
    extras: dict[str, Any] = Field(default_factory=dict, description="free table passed to setup.extras")
    dynamic_filter_fn: str | None = Field(
        None, description="'module:function'(group) -> bool; False rejects the group (frees its gate slots)"
    )
    evaluation_fn: str | None = Field(
        None, description="'module:function'(ctx) -> dict[str, float], run by the trainer; metrics under eval/"
    )
    evaluation_interval: int = Field(1, ge=1, le=1_000_000, description="evaluate every N published versions")
    max_rows: int = Field(
        100, ge=1, le=100_000_000, description="rows read from the dataset (the built-in task: problems drawn); the "
        "cookbook's default"
    )
    epochs: int = Field(1, ge=1, le=10_000, description="passes over the rows")
    shuffle: bool = Field(True, description="shuffle rows each epoch (seeded)")
    seed: int = Field(0, ge=0, description="seed for data order, sampling and init")
    learning_rate: float = Field(1e-5, gt=0, le=1.0, description="AdamW learning rate (the cookbook's default, for an "
                                 "8B model)")
    completions_per_prompt: int = Field(4, ge=2, le=1024, description="G: completions per prompt group")
    prompt_groups_per_step: int = Field(1, ge=1, le=65_536, description="P: groups per optimizer step")
    max_completion_tokens: int = Field(
        1024, ge=1, le=131_072, description="max generated tokens per completion; must leave the prompt room in the "
        "model's positions (checked when the run starts: builtin:tiny has 128)"
    )
    max_seq_len: Annotated[int, BeforeValidator(lambda v: MAX_SEQ_LEN_LIMIT if v is None else v)] = Field(
        2048, ge=2, le=MAX_SEQ_LEN_LIMIT,
        description="max prompt + completion tokens; with max_completion_tokens it must keep a sequence within the "
        "model's positions (checked when the run starts); None from Python or JSON = no limit. The cookbook's None "
        "takes a training shape's context length, which rlstream has not got: it keeps 2048"
    )
    temperature: float = Field(1.0, gt=0, le=10.0, description="sampling temperature (trainer logprobs use it too)")
    policy_loss: PolicyLoss = Field(
        "grpo", description="policy loss (trainer/losses.py)"
    )
    lr_schedule: LrSchedule = Field(
        "constant", description="learning-rate schedule after warmup; linear/cosine decay to 0 at max_steps"
    )
    lr_warmup_steps: int = Field(0, ge=0, le=1_000_000, description="linear warmup steps")
    kl_beta: float = Field(
        0.001, ge=0, le=100.0, description="reference-KL coefficient (the cookbook's 0.001); > 0 loads a frozen "
        "reference model into the trainer (reference_model), as the cookbook provisions a reference trainer; 0 = none"
    )
    kl_estimator: KlEstimator = Field("k3", description="KL estimator against the reference")
    reference_model: PathText | None = Field(
        None, description="HF directory of the frozen reference; unset = base_model (same tokenizer required)"
    )
    lora_rank: int = Field(
        0, ge=0, le=1024, description="LoRA rank (peft); 0 = full fine-tuning. Published weights are merged, "
        "checkpoints hold the adapter"
    )
    lora_alpha: int | None = Field(
        None, ge=1, le=65_536,
        description="LoRA scale numerator (scale = lora_alpha / lora_rank); unset = 2 x lora_rank"
    )
    lora_target_modules: LoraTargets = Field(
        "all-linear", description="modules LoRA adapts: \"all-linear\" (every linear layer but the output head) "
        "or a list of module names, e.g. [\"q_proj\", \"v_proj\"]"
    )
    eps_clip: float = Field(0.2, gt=0, lt=1, description="PPO clip, low side")
    eps_clip_high: float | None = Field(None, gt=0, le=10, description="PPO clip, high side; unset = loss default")
    eps_clip_c: float | None = Field(None, gt=1, le=100, description="dual clip for A < 0 (grpo, dapo); unset = off")
    dro_beta: float = Field(0.05, ge=0, le=100, description="quadratic proximal penalty of the dro loss")
    gspo_clip: float = Field(0.2, gt=0, lt=1, description="gspo: the sequence ratio is clipped to [1 - c, 1 + c]")
    cispo_eps_low: float = Field(
        0.2, ge=0, lt=1, description="cispo: the detached ratio is clipped below at 1 - eps_low")
    cispo_eps_high: float = Field(0.28, ge=0, le=10, description="cispo: ... and above at 1 + eps_high")
    normalization: Normalization = Field(
        "token_mean", description="how per-token losses reduce to the batch loss"
    )
    advantage: str = Field(
        "grpo", description="grpo ((r-mean)/std), dr_grpo (r-mean), igpo (turn-level information gain, one "
        "advantage per token: docs/algorithms.md) or 'module:function' (rewards_G -> advantages_G)"
    )
    igpo_gamma: float = Field(
        0.99, ge=0, le=1, description="advantage igpo: the discount of the turns' normalised rewards, "
        "A_t = sum over k >= t of gamma^(k-t) r_k (the cookbook's igpo_loop gamma, 0.99)"
    )
    igpo_normalization: IgpoNormalization = Field(
        "joint", description="advantage igpo: how a group's turn rewards are normalised. joint: all z-scored "
        "together (the paper's); mean: minus their mean, not divided by their std (gains keep their probability "
        "units beside the outcome: a group of failed outcomes and small gains gets small advantages); separate: "
        "gains and outcomes each z-scored over the group's turns, then added (the cookbook's "
        "compute_turn_advantages). docs/algorithms.md"
    )
    igpo_ig_weight: float = Field(
        1.0, ge=0, le=100, description="advantage igpo: the information gains' weight against the outcome "
        "(the cookbook's ig_weight): each gain is multiplied by it before a joint or mean normalisation, the "
        "normalised gains after a separate one; 0 leaves only the outcome"
    )
    anchor_logp: Literal["old_policy", "rollout"] = Field(
        "old_policy", description="PPO anchor: current weights before the update, or the behaviour logprobs (w = 1)"
    )
    ppo_n_minibatches: int = Field(
        1, ge=1, le=4096, description="optimizer steps per rollout batch (min(K, B) slices); one version bump per batch"
    )
    tis: TisConfig = Field(default_factory=TisConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    grad_clip_norm: float | None = Field(
        1.0, ge=0, description="global grad-norm clip; 0 or unset = none (the cookbook's 0.0)")
    max_head_offpolicy_versions: int = Field(
        0, ge=0, le=1024, description="O: how many versions sampling may run ahead of training "
                                  "(0 = strict on-policy, the cookbook's default)"
    )
    max_concurrency_rollout_sample: int | None = Field(
        None, ge=2, description="C: max in-flight samples; unset = limited by the staleness gate only"
    )
    synchronous_training: bool = Field(
        False, description="drain all in-flight rollouts before each step (forces O = 0)"
    )
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    weight_sync_interval: int = Field(
        1, ge=0, le=1_000_000, description="publish weights every N steps (1 = every step, 0 = never); <= O + 1"
    )
    max_incomplete_group_retries: int = Field(
        1, ge=0, le=100, description="rounds a worker re-draws the missing members of a group before emitting it"
    )
    min_group_size: int = Field(
        2, ge=1, le=1024, description="an incomplete group trains if it has this many samples (a single one has no "
        "group-relative advantage and is rejected with that reason)"
    )
    dcp_save_interval: int = Field(
        50, ge=0, le=10_000_000, description="train-state checkpoint every N steps, then archive + trim; 0 = final "
        "only (the cookbook's default; rlstream keeps 50 so that a crash costs at most 50 steps)"
    )
    save_final_checkpoint: bool = Field(True, description="write a train-state checkpoint when the run ends")
    init_from_checkpoint: PathText | None = Field(
        None, description="checkpoint directory to start a new run from (weights + optimizer; steps restart at 0)"
    )
    output_model_id: str | None = Field(
        # One plain path component: "..", "." or "a/../.." would leave models/ (export
        # replaces the directory it names); a leading "." would collide with temp dirs.
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
        description="export the final weights to runs/<run>/models/<id>/ (a standalone HF directory); "
        "1-128 letters, digits, '_', '.', '-', starting with a letter or digit",
    )
    rollout_max_retries: int = Field(2, ge=0, le=100, description="retries of a rollout_fn draw that raised")
    job_timeout: int = Field(60, ge=5, le=86_400, description="seconds before a rollout job is presumed dead")
    keep_weights: int = Field(3, ge=1, le=10_000, description="published weight versions kept on disk")
    torch_threads: int = Field(
        1, ge=1, le=512, description="torch threads per process (1 is fastest when processes share cores)")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="torch device of every process; auto = cuda if "
                        "available; trainer.device and workers.device override it per role")
    redis: RedisConfig = Field(default_factory=RedisConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    # The cookbook's tables (core.cookbook_config): their self-hosted spellings are moved onto the
    # fields above before validation, their hosted-only fields kept as written. frozen: assigning a
    # table to a built Config would skip the move (two copies of one value); set rlstream's field.
    deployment: DeployConfig = Field(default_factory=DeployConfig, frozen=True)
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig, frozen=True)
    infra: InfraConfig = Field(default_factory=InfraConfig, frozen=True)
    # The cookbook recipe's own fields (core.cookbook_config): spellings are moved onto the fields
    # above before validation (and read None after), hosted-only ones kept as written and reported.
    lr_scheduler: LRSchedulerSpec | None = Field(
        None, frozen=True, description="spelling of `lr_schedule` and `lr_warmup_steps` (the cookbook's "
        "ConstantSchedule / LinearSchedule / CosineSchedule(warmup_steps=N), or a table with `type`); a "
        "warmup ratio, a minimum ratio, a partial decay or WSD is refused (no equivalent)"
    )
    pipeline_chunks_per_step: int | None = Field(
        None, ge=1, le=65_536, frozen=True, description="spelling of `trainer.streaming` (N > 1: on, and an unset "
        "trainer.micro_batch_tokens becomes ceil(B / N) x max_seq_len, so a chunk holds at most B / N rows; 1: off)"
    )
    grad_accumulation_normalization: GradAccNormalization | Literal["num_loss_tokens", "num_sequences", "none"] | \
        None = Field(None, frozen=True, description="spelling of `normalization` (num_loss_tokens = token_mean, "
                     "num_sequences = sequence_mean); \"none\" is hosted only, accepted and ignored: gradients are "
                     "never summed unnormalised here")
    weight_sync_timeout: float | None = Field(
        None, gt=0, le=86_400, frozen=True, description="spelling of `inference.weight_sync_timeout`")
    warm_start_from_adapter: str | None = Field(
        None, description="the cookbook's LoRA warm start from a PEFT adapter: not supported, refused with the "
        "way round (merge the adapter into base_model)")
    cleanup_on_exit: bool | None = hosted("cleanup_on_exit")
    router_replay: bool | None = hosted("router_replay")
    router_replay_completion_only: bool | None = hosted("router_replay_completion_only")
    weight_sync_before_training: bool | None = hosted("weight_sync_before_training")

    @model_validator(mode="before")
    @classmethod
    def _move_cookbook_spellings(cls, data: Any) -> Any:
        defaults = {name: cls.model_fields[name].default
                    for name in ("base_model", "prompt_groups_per_step", "completions_per_prompt", "max_seq_len")}
        return move_cookbook_spellings(data, {**defaults, "max_seq_len_limit": MAX_SEQ_LEN_LIMIT})

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.run_id is not None:
            try:
                check_run_id(self.run_id)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        if self.max_concurrency_rollout_sample is not None and (
            self.max_concurrency_rollout_sample < self.completions_per_prompt
        ):
            raise ValueError("max_concurrency_rollout_sample must be >= completions_per_prompt")
        if self.advantage not in ADVANTAGE_METHODS + TOKEN_ADVANTAGE_METHODS:
            check_spec(self.advantage, "advantage", ADVANTAGE_METHODS)
        if self.reward_fn not in BUILTIN_REWARDS:
            check_spec(self.reward_fn, "reward_fn", BUILTIN_REWARDS)
        for name in ("rollout_fn_factory", "dynamic_filter_fn", "evaluation_fn"):
            if getattr(self, name) is not None:
                check_spec(getattr(self, name), name)
        if self.weight_sync_interval > self.offpolicy_versions + 1:
            raise ValueError(
                f"weight_sync_interval {self.weight_sync_interval} exceeds max_head_offpolicy_versions + 1 = "
                f"{self.offpolicy_versions + 1} (synchronous_training counts as 0): the gate would stall the trainer"
            )
        if self.min_group_size > self.completions_per_prompt:
            raise ValueError("min_group_size exceeds completions_per_prompt")
        if self.ppo_n_minibatches > self.batch_size:
            raise ValueError(
                f"ppo_n_minibatches {self.ppo_n_minibatches} exceeds the batch of {self.batch_size} samples")
        if self.trainer.streaming and self.ppo_n_minibatches > 1:  # later minibatches need the first one's update
            raise ValueError("trainer.streaming (the cookbook's pipeline_chunks_per_step > 1) needs "
                             "ppo_n_minibatches = 1")
        if self.warm_start_from_adapter is not None:
            raise ValueError(
                f"warm_start_from_adapter = {self.warm_start_from_adapter!r}: rlstream cannot start LoRA from a PEFT "
                "adapter yet, and training without it would not be the run you asked for. Merge the adapter into "
                "its base model (peft: PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained"
                "(dir)) and set base_model to that directory, or continue an rlstream run (init_from_checkpoint)")
        if self.lr_schedule != "constant" and self.max_steps is None:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} decays to 0 at max_steps: set max_steps")
        return self

    @property
    def batch_size(self) -> int:
        """B = P * G samples per optimizer step."""
        return self.prompt_groups_per_step * self.completions_per_prompt

    @property
    def trainer_device(self) -> str:
        """``trainer.device`` when set, else the top-level ``device``."""
        return self.trainer.device or self.device

    @property
    def workers_device(self) -> str:
        """``workers.device`` when set, else the top-level ``device``."""
        return self.workers.device or self.device

    @property
    def groups_per_job(self) -> int:
        """Most prompt groups one rq job carries (``workers.groups_per_job``; unset: the local
        backend splits a step's groups over the workers, a remote one sends each group alone)."""
        if self.workers.groups_per_job is not None:
            return self.workers.groups_per_job
        if self.inference.remote:
            return 1
        return max(1, math.ceil(self.prompt_groups_per_step / max(1, self.workers.count)))

    @property
    def offpolicy_versions(self) -> int:
        """O as the gate applies it: synchronous training is strictly on-policy."""
        return 0 if self.synchronous_training else self.max_head_offpolicy_versions

    def sample_kwargs(self) -> dict[str, Any]:
        """``setup.sample_kwargs`` (the cookbook's names); ``top_k=0`` means off: transformers
        would otherwise apply top_k=50 and the behaviour logprobs would lie
        (docs/design.md §15.16 Sampling with top_k = 0)."""
        return dict(max_tokens=self.max_completion_tokens, temperature=self.temperature, top_p=1.0, top_k=0,
                    max_seq_len=self.max_seq_len, logprobs=True)

    def run_dir(self) -> Path:
        if self.run_id is None:
            raise ConfigError("run_id is not set: pass --run-id, set run_id in the config or RLSTREAM_RUN_ID")
        return Path(self.log_path) / self.run_id


# --------------------------------------------------------------------------- file, environment, --set
def new_run_id() -> str:
    return "run-" + uuid.uuid4().hex[:8]


ENV_PREFIX = "RLSTREAM_"


def _is_text_field(dotted: str) -> bool:
    """True when the field at ``dotted`` is a string field (``run_id = 42`` means "42")."""
    model: Any = Config
    for part in dotted.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False
        model = field.annotation
    options = typing.get_args(model) if typing.get_origin(model) in (typing.Union, types.UnionType) else (model,)
    # Annotated[str, ...] (PathText) counts as str
    return any(typing.get_args(o)[0] is str if typing.get_origin(o) is Annotated else o is str for o in options)


def _parse_value(text: str, dotted: str = "") -> Any:
    """``--set``/env values are TOML literals when they parse as one, else plain strings;
    a string field keeps the text as given (unless it is a quoted TOML string)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    if _is_text_field(dotted) and not isinstance(value, str):
        return text
    return value


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Put ``value`` at the dotted field of a config's data, making its tables as needed."""
    *parents, leaf = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config error: {dotted}: {part} is not a table")
    node[leaf] = value


def _env_names() -> dict[str, str]:
    """``RLSTREAM_<FIELD>`` (``RLSTREAM_<TABLE>_<FIELD>`` for tables) -> dotted field."""
    out = {}
    for name, field in Config.model_fields.items():
        sub = field.annotation if isinstance(field.annotation, type) else None
        if sub is not None and issubclass(sub, BaseModel):
            out |= {f"{ENV_PREFIX}{name}_{inner}".upper(): f"{name}.{inner}" for inner in sub.model_fields}
        else:
            out[f"{ENV_PREFIX}{name}".upper()] = name
    return out


def env_override_names() -> frozenset[str]:
    """The environment variables that override config fields."""
    return frozenset(_env_names())


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any]]:
    """(dotted field, value) for every ``RLSTREAM_*`` variable in ``environ``."""
    return [(dotted, _parse_value(environ[key], dotted)) for key, dotted in _env_names().items() if key in environ]


def _read_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: file {str(path)!r} does not exist")
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config error: {path}: {exc}") from None


def _shown(value: Any) -> Any:
    try:
        return redacted(value) if isinstance(value, str) and "@" in value else value
    except ValueError:  # not parseable as a URL: nothing to redact
        return value


def validate_config(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            shown = _shown(err["input"])  # a URL's password never reaches the terminal or a log
            got = err["type"] != "extra_forbidden" and loc != "config" and not isinstance(err["input"], dict)
            parts.append((f"{loc}: " if loc != "config" else "") + msg + (f" (got {shown!r})" if got else ""))
        raise ConfigError("config error: " + "; ".join(parts)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """File, then ``RLSTREAM_*`` environment, then ``--set k=v`` (later wins)."""
    data = _read_file(path) if path is not None else {}
    for dotted, value in env_overrides(os.environ if environ is None else environ):
        set_path(data, dotted, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config error: --set {item!r} must look like field=value")
        dotted, _, text = item.partition("=")
        if not dotted.strip():
            raise ConfigError(f"config error: --set {item!r} names no field")
        set_path(data, dotted.strip(), _parse_value(text.strip(), dotted.strip()))
    return validate_config(data)
