"""Every wire message of rlstream, in one module.

All messages are frozen pydantic models with a ``kind`` discriminator and a
``schema_version``; ``rlstream.core.codec`` turns them into msgpack bytes (per-token arrays
travel packed, see ``PACKED``). Stream entries carry one encoded message each.

``RolloutRecord`` is a sample on the rollouts stream (kind ``"rollout_sample"``). Users never
build it: their ``rollout_fn`` returns the cookbook's plain dataclass ``rlstream.RolloutSample``
(rlstream/core/rollout.py), which the worker converts with ``to_record`` (the invariants checked
there, with the message the user needs) and stamps with the provenance fields (ids, versions,
worker) by ``model_copy(update=...)`` before XADD (docs/design.md §15.88 RolloutSample is the
user's dataclass, the wire record is the codec's).
"""
from __future__ import annotations

import math
import sys
from array import array
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

SCHEMA_VERSION = 1


def _to_array(typecode: str):
    """Per-token fields live as ``array.array``: validating them element by element in
    pydantic costs ~150 us per 1k-token sample, an array costs ~10 us, and the trainer
    turns it into a tensor without a copy (``torch.frombuffer``)."""

    def convert(value: Any) -> array:
        if isinstance(value, array) and value.typecode == typecode:
            return value
        if isinstance(value, (str, bytes, dict)):
            raise ValueError(f"expected a list of numbers, got {type(value).__name__}")
        try:
            return array(typecode, value)
        except (TypeError, OverflowError) as exc:
            kind = {"i": "int32 token ids", "f": "float logprobs", "B": "0/1 mask values"}[typecode]
            raise ValueError(f"expected {kind}: {exc}") from None

    return convert


def _listify(value: array) -> list:
    return value.tolist()


def _no_text_or_bool(value: Any) -> Any:
    """Scalars of RolloutRecord are numbers, never coerced from text or bools (a sample's fields
    come from the user's dataclass unchecked, so the check lives on the fields, not only in
    ``model_validate(strict=True)``); numpy scalars still pass."""
    if isinstance(value, bool):
        raise ValueError("expected a number, got bool")
    return _no_text(value)


def _no_text(value: Any) -> Any:
    """A metric of a sample is a number, never text; a bool is one (``metrics["correct"] = reward > 0``
    is 1.0 or 0.0, what the rollout metrics average)."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r:.40}")
    return value


Float = Annotated[float, BeforeValidator(_no_text_or_bool)]
MetricValue = Annotated[float, BeforeValidator(_no_text)]
Int = Annotated[int, BeforeValidator(_no_text_or_bool)]
TokenArray = Annotated[array, BeforeValidator(_to_array("i")), PlainSerializer(_listify, when_used="json")]
FloatArray = Annotated[array, BeforeValidator(_to_array("f")), PlainSerializer(_listify, when_used="json")]
MaskArray = Annotated[array, BeforeValidator(_to_array("B")), PlainSerializer(_listify, when_used="json")]


class Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    schema_version: int = SCHEMA_VERSION
    # Per-token fields the codec packs as little-endian arrays: name -> array typecode.
    PACKED: ClassVar[dict[str, str]] = {}


# --------------------------------------------------------------------------- rollouts


def group_id_for(epoch: int, row_index: int, attempt: int) -> str:
    """Deterministic group id (rq job ids allow only ``[A-Za-z0-9_-]``)."""
    return f"e{epoch}-r{row_index}-a{attempt}"


def sample_id_for(group_id: str, member: int) -> str:
    return f"{group_id}-m{member}"


# The byte holding an int32's sign bit in native order, and the byte values without it.
_SIGN_BYTE = 0 if sys.byteorder == "big" else 3
_NON_NEGATIVE_HIGH_BYTES = bytes(range(128))
# A float32's high byte holds its sign and 7 exponent bits: 0x7F or 0xFF there means |x| >= 2**127,
# inf or NaN. Only samples with such a byte pay for the exact per-value check.
_SMALL_FLOAT_HIGH_BYTES = bytes(b for b in range(256) if b & 0x7F != 0x7F)


class RolloutRecord(Message):
    """One completion on the wire: tokens (prompt + completion), behaviour logprobs, loss mask,
    reward, and the worker's provenance stamp. The user's side is ``rlstream.RolloutSample``."""

    kind: Literal["rollout_sample"] = "rollout_sample"
    PACKED: ClassVar[dict[str, str]] = {"tokens": "i", "logprobs": "f", "loss_mask": "B", "answer_tokens": "i"}

    tokens: TokenArray
    logprobs: FloatArray = Field(description="behaviour logprob per token; 0.0 where not generated")
    loss_mask: MaskArray = Field(description="1 on policy-generated tokens, 0 elsewhere")
    reward: Float
    finish_reason: str = "stop"
    text: str = ""
    metrics: dict[str, MetricValue] = Field(default_factory=dict)
    # advantage = "igpo" only: the ground-truth answer's token ids, scored after each turn's prefix
    # (trainer/igpo.py); empty for every other advantage.
    answer_tokens: TokenArray = Field(default_factory=lambda: array("i"),
                                      description="ground-truth answer token ids (advantage igpo); empty = none")
    # Provenance, stamped by the worker (the defaults: not stamped yet).
    sample_id: str = ""
    group_id: str = ""
    group_size: Int = Field(0, ge=0, description="samples the worker emitted for this group")
    row_index: Int = -1
    epoch: Int = 0
    submit_version: Int = 0
    min_version: Int = 0
    max_version: Int = 0
    worker_id: str = ""
    # Wall-clock seconds (time.time() on the worker) its group's sampling began and ended; 0.0 when
    # unknown (older workers). The trainer's perf/overlap_ratio reads them (docs/operations.md, "Perf and
    # rollout metrics").
    started_at: Float = 0.0
    finished_at: Float = 0.0

    @model_validator(mode="after")
    def _check_invariants(self) -> RolloutRecord:
        n = len(self.tokens)
        if len(self.logprobs) != n or len(self.loss_mask) != n:
            raise ValueError(
                f"tokens, logprobs and loss_mask must have equal lengths, got "
                f"{n}, {len(self.logprobs)}, {len(self.loss_mask)}"
            )
        if n < 2:
            raise ValueError(f"a sample needs at least 2 tokens (prompt + completion), got {n}")
        # Byte-level checks run at C speed (a Python loop over 1k tokens costs ~30 us each).
        mask_bytes = self.loss_mask.tobytes()
        if mask_bytes.translate(None, b"\x00\x01"):
            raise ValueError("loss_mask values must be 0 or 1")
        if b"\x01" not in mask_bytes:
            raise ValueError("loss_mask has no 1: nothing in this sample would be trained")
        if self.tokens.tobytes()[_SIGN_BYTE::4].translate(None, _NON_NEGATIVE_HIGH_BYTES):
            raise ValueError("token ids must be >= 0")
        if not math.isfinite(self.reward):
            raise ValueError(f"reward must be finite, got {self.reward}")
        if self.logprobs.tobytes()[_SIGN_BYTE::4].translate(None, _SMALL_FLOAT_HIGH_BYTES) \
                and not math.isfinite(sum(self.logprobs)):  # float32 values cannot overflow a float64 sum
            raise ValueError("logprobs must all be finite")
        if self.max_version < self.min_version:
            raise ValueError("max_version < min_version")
        return self

    @staticmethod
    def invariants_hold(samples: list[RolloutRecord]) -> bool:
        """Whether every one of ``samples`` passes ``_check_invariants``, checked at once: the byte
        checks run on the batch's arrays joined (one call each, not one per sample). False when one
        may fail (also when a logprob is >= 2**127 in magnitude, which only the exact check tells):
        then check each, for its own verdict and message."""
        for s in samples:
            n = len(s.tokens)
            if n < 2 or len(s.logprobs) != n or len(s.loss_mask) != n or 1 not in s.loss_mask \
                    or not math.isfinite(s.reward) or s.max_version < s.min_version:
                return False
        if b"".join(s.loss_mask for s in samples).translate(None, b"\x00\x01"):
            return False
        if b"".join(s.tokens for s in samples)[_SIGN_BYTE::4].translate(None, _NON_NEGATIVE_HIGH_BYTES):
            return False  # every array holds whole int32s: the join keeps each one's sign byte at _SIGN_BYTE mod 4
        return not b"".join(s.logprobs for s in samples)[_SIGN_BYTE::4].translate(None, _SMALL_FLOAT_HIGH_BYTES)

    @staticmethod
    def within_limits(samples: list[RolloutRecord], vocab_size: int | None, max_seq_len: int | None) -> bool:
        """Whether ``check_limits`` passes for every one of ``samples`` (one max over them all)."""
        if max_seq_len is not None and any(len(s.tokens) > max_seq_len for s in samples):
            return False
        return vocab_size is None or not samples or max(map(max, (s.tokens for s in samples))) < vocab_size

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError when a token id is outside ``[0, vocab_size)``."""
        top = max(self.tokens)
        if top >= vocab_size:
            raise ValueError(f"token id {top} outside the vocabulary (size {vocab_size})")

    def check_limits(self, vocab_size: int | None, max_seq_len: int | None) -> None:
        """The model-dependent checks (the codec cannot know the model): raise ValueError
        when the sample is longer than ``max_seq_len`` or has a token outside the vocabulary."""
        if max_seq_len is not None and len(self.tokens) > max_seq_len:
            raise ValueError(f"{len(self.tokens)} tokens exceed max_seq_len {max_seq_len}")
        if vocab_size is not None:
            self.check_vocab(vocab_size)


class GroupJob(Message):
    """One prompt group of ``group_size`` completions, as a ``RolloutJob`` carries it."""

    kind: Literal["group_job"] = "group_job"
    run_id: str
    group_id: str
    row_index: int = Field(ge=0)
    epoch: int = Field(ge=0)
    attempt: int = Field(ge=0)
    submit_version: int = Field(ge=0)
    group_size: int = Field(ge=2)
    row: dict[str, Any]


class RolloutJob(Message):
    """Payload of one rq job: the prompt groups one worker samples together and records in
    one MULTI (``workers.groups_per_job``; docs/design.md §15.75 Several groups per rq job).
    It travels as rq's JSON (``model_dump(mode="json")``), never through the msgpack codec."""

    kind: Literal["rollout_job"] = "rollout_job"
    run_id: str
    # Its rq job id, fixed at admission: that of its first group's one-group job. A job enqueued
    # again may carry fewer groups (the open ones), not always that first one.
    job_id: str = ""
    groups: list[GroupJob] = Field(min_length=1)


# --------------------------------------------------------------------------- events


class RunStarted(Message):
    kind: Literal["run_started"] = "run_started"
    run_id: str
    config: dict[str, Any]


class GroupAdmitted(Message):
    """The producer admitted a group under the gate and enqueued its job (one MULTI)."""

    kind: Literal["group_admitted"] = "group_admitted"
    group_id: str
    row_index: int
    epoch: int
    attempt: int
    submit_version: int
    group_size: int
    job_id: str = ""  # the rq job carrying the group ("": keys.job_id(run, group_id), one group per job)


class GroupRejected(Message):
    """A group that will not be trained, and why; its gate slots are freed."""

    kind: Literal["group_rejected"] = "group_rejected"
    group_id: str
    reason: str
    by: str = ""


class GroupSampled(Message):
    """A worker wrote the group's samples (in the same MULTI as the samples): from here on
    the group is the trainer's to settle, and no longer the producer's to re-dispatch."""

    kind: Literal["group_sampled"] = "group_sampled"
    group_id: str
    samples: int = Field(ge=0)
    worker_id: str = ""
    version: int = Field(0, ge=0)
    tokens: int = Field(0, ge=0, description="generated (loss_mask 1) tokens of the samples; 0 from older workers")


class StepCommitted(Message):
    """Written by the commit's Lua script, atomically with the XACK of ``entry_ids`` on the
    rollouts stream (docs/design.md §7 Commit protocol)."""

    kind: Literal["step_committed"] = "step_committed"
    step: int = Field(ge=1)
    version: int = Field(ge=1, description="version these weights become once published")
    entry_ids: list[str]
    sample_ids: list[str]
    group_ids: list[str]
    metrics: dict[str, int | float] = Field(default_factory=dict)


class WeightsPublished(Message):
    kind: Literal["weights_published"] = "weights_published"
    version: int = Field(ge=0)
    uri: str
    sha256: str
    bytes: int = Field(ge=0)


class Evaluated(Message):
    """The trainer ran ``evaluation_fn`` on ``version``; ``metrics`` are ``eval/...``."""

    kind: Literal["evaluated"] = "evaluated"
    step: int = Field(ge=0)
    version: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)


class DatasetExhausted(Message):
    """The producer admitted its last row: ``groups`` is the total ever admitted (first
    attempts). The trainer needs it to end a run on data exhaustion without guessing
    (docs/design.md §15.3 DatasetExhausted event)."""

    kind: Literal["dataset_exhausted"] = "dataset_exhausted"
    groups: int = Field(ge=0)


class RunFinished(Message):
    kind: Literal["run_finished"] = "run_finished"
    reason: str
    step: int = 0
    version: int = 0
    failed: bool = False  # e.g. the rollout circuit breaker stopped the run



# The SDK's events (docs/design.md §15.66 The SDK's events: steps, snapshots and states in the run's log).
class OptimStepped(Message):
    """An SDK ``optim_step`` (``step`` counts them; a loaded state sets it back); ``train/...`` metrics."""

    kind: Literal["optim_stepped"] = "optim_stepped"
    step: int = Field(ge=1)
    metrics: dict[str, int | float] = Field(default_factory=dict)


class SamplerSaved(Message):
    """``save_weights_for_sampler(name)``: the weights at ``step`` sealed in ``<run dir>/weights/v<version>``."""

    kind: Literal["sampler_saved"] = "sampler_saved"
    name: str
    step: int = Field(ge=0)
    version: int = Field(ge=1)
    sha256: str
    bytes: int = Field(ge=0)


class StateSaved(Message):
    """``save_state(name)``: weights, optimizer and RNG at ``step``, sealed in ``<run dir>/states/<name>``."""

    kind: Literal["state_saved"] = "state_saved"
    name: str
    step: int = Field(ge=0)
    sha256: str
    bytes: int = Field(ge=0)


class StateLoaded(Message):
    """A training client loaded state ``name``: the steps after it continue from ``step``."""

    kind: Literal["state_loaded"] = "state_loaded"
    name: str
    step: int = Field(ge=0)
    with_optimizer: bool = True

class DeadLetter(Message):
    """What ``rl:{run}:dead`` holds: the source entry, the reason, the raw bytes."""

    kind: Literal["dead_letter"] = "dead_letter"
    source_stream: str
    source_id: str
    reason: str
    raw: bytes = b""  # the first 64 KiB: enough to inspect, not to re-decode a long sample
    # Set when the entry was a worker-stamped sample (it failed only the trainer's vocabulary /
    # max_seq_len checks): its group must be settled without it, also after a restart.
    sample_id: str = ""
    group_id: str = ""
    group_size: int = 0


EVENT_TYPES: tuple[type[Message], ...] = (
    RunStarted, GroupAdmitted, GroupRejected, GroupSampled, StepCommitted, WeightsPublished, Evaluated,
    DatasetExhausted, RunFinished,
)
EVENT_TYPES = (*EVENT_TYPES, OptimStepped, SamplerSaved, StateSaved, StateLoaded)  # the SDK's
MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.model_fields["kind"].default: cls
    for cls in (RolloutRecord, GroupJob, DeadLetter, *EVENT_TYPES)
}
