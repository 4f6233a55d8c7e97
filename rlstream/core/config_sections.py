"""The tables of the run configuration (``[redis]``, ``[workers]``, ``[inference]``,
``[tis]``, ``[trainer]``, ``[wandb]``, ``[retention]``). No torch here: the CLI validates configs
before heavy imports."""
from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, SerializationInfo, field_serializer, model_validator

from rlstream.core.choices import TisLevel, TrainerDtype
from rlstream.core.credentials import without_password
from rlstream.core.hosted_fields import HostedTrainerFields


class ConfigSection(BaseModel):
    # strict: TOML has real types, so `seed = true` or `learning_rate = "1e-3"` is a mistake to
    # report, not to coerce (`--set` and environment values are parsed as TOML literals first).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


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
        "fixed", description="openai backend: requests in flight per worker stay at `inference.max_concurrency` "
        "(fixed), or adapt to the server's latency and 429/503 answers between 1 and it, starting at 16 (adaptive, "
        "AIMD); a worker takes more groups while the window has room"
    )
    local_max_batch: int | None = Field(
        None, ge=1, le=65536, description="local backend: most rows one `generate` holds; a worker then samples up "
        "to local_max_batch / completions_per_prompt groups at once, batching their draws; unset = one group at a "
        "time (each job's draws reproducible from its seed)"
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

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        if self.streaming and self.micro_batch_tokens is None:
            raise ValueError("streaming runs the batch in micro-batches as its groups arrive: set micro_batch_tokens")
        return self


class InferenceConfig(ConfigSection):
    """Where workers sample: the local transformers model, or an OpenAI-compatible server."""

    backend: Literal["local", "openai"] = Field(
        "local", description="local = a transformers model in each worker; openai = an OpenAI-compatible "
        "server (vLLM, SGLang) over httpx"
    )
    base_url: str | None = Field(
        None, pattern=r"^https?://", description="the server's API root, e.g. http://127.0.0.1:8000/v1 (openai backend)"
    )
    model: str | None = Field(None, description="model name sent with each request; unset = base_model")
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="environment variable holding a bearer token (the key itself never goes in a config file)",
    )
    weight_sync_url: str | None = Field(
        None, pattern=r"^https?://", description="POSTed {model_path, version} for each new version "
        "(SGLang: .../update_weights_from_disk); unset = the server is never updated"
    )
    timeout: float = Field(120.0, gt=0, le=3600, description="seconds per HTTP request")
    max_retries: int = Field(4, ge=0, le=20, description="retries of a request on connection errors, 429 and 5xx "
                             "(exponential backoff from 0.5 s, capped at 8 s)")
    max_concurrency: int = Field(64, ge=1, le=4096, description="requests in flight per worker (across the groups it "
                                 "samples at once)")

    @model_validator(mode="after")
    def _check(self) -> InferenceConfig:
        if self.backend == "openai" and self.base_url is None:
            raise ValueError("backend 'openai' needs base_url (e.g. http://127.0.0.1:8000/v1)")
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
