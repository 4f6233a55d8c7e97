"""The SDK's plain data types, shaped like the Tinker / Fireworks SDK's so seed code ports with
its imports changed: ``Datum``, ``ModelInput``, ``TensorData``, ``AdamParams``,
``SamplingParams``, the results the calls return, and ``Done``, the future every call returns.

No torch at import: these are what a caller builds and reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Done(Generic[T]):
    """A call's future. The training client runs in the caller's process, so every call has
    finished when it returns: ``result()`` hands the value back at once (a raised error was
    raised by the call itself). Attribute access reaches the result, so code that forgets
    ``.result()`` (``reference.forward(...).loss_fn_outputs``, as the seed's rl_loop writes
    it) works too."""

    def __init__(self, value: T):
        self._value = value

    def result(self, timeout: float | None = None) -> T:
        return self._value

    def done(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._value, name)


@dataclass(frozen=True)
class ModelInput:
    """Tinker's model input: the tokens the model reads (``tokens[:-1]`` of a datum)."""

    tokens: list[int]

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls([int(t) for t in tokens])

    def to_ints(self) -> list[int]:
        return list(self.tokens)

    @property
    def length(self) -> int:
        return len(self.tokens)


TENSOR_DTYPES = ("float32", "int64")


@dataclass(frozen=True)
class TensorData:
    """An array as Tinker passes it: ``data`` flat (a list), ``dtype`` ("float32" or "int64")
    and ``shape`` (None: one dimension, ``len(data)``), e.g. ``TensorData(data=tokens[1:],
    dtype="int64", shape=[n])``. ``to_torch()`` makes the tensor, ``from_torch`` the reverse;
    a result's per-token logprobs are one (``.data`` is the list). ``TensorData(values)`` is a
    float32 vector."""

    data: list
    dtype: str = "float32"
    shape: list[int] | None = None

    def __post_init__(self) -> None:
        if self.dtype not in TENSOR_DTYPES:
            raise ValueError(f"TensorData dtype must be one of {', '.join(TENSOR_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "data", list(self.data))
        if self.shape is not None:
            shape = [int(d) for d in self.shape]
            if any(d < 0 for d in shape) or math.prod(shape) != len(self.data):
                raise ValueError(f"TensorData shape {shape} holds {math.prod(shape)} values, data has {len(self.data)}")
            object.__setattr__(self, "shape", shape)

    def tolist(self) -> list:
        return list(self.data)

    def to_torch(self):
        import torch

        tensor = torch.tensor(self.data, dtype=torch.int64 if self.dtype == "int64" else torch.float32)
        return tensor.reshape(self.shape) if self.shape is not None else tensor

    @classmethod
    def from_torch(cls, tensor) -> TensorData:
        tensor = tensor.detach().cpu()
        integer = not tensor.is_floating_point()
        flat = tensor.flatten().long() if integer else tensor.flatten().float()
        return cls(flat.tolist(), "int64" if integer else "float32", list(tensor.shape))


@dataclass
class Datum:
    """One sequence to train on: ``tokens`` (prompt + completion) and whatever the objective
    reads in ``loss_fn_inputs`` (advantages, masks, old logprobs...). Tinker's form is
    accepted too: ``Datum(model_input=ModelInput.from_ints(tokens[:-1]),
    loss_fn_inputs={"target_tokens": tokens[1:], ...})``. Either way the model computes
    ``len(tokens) - 1`` next-token logprobs for it."""

    tokens: list[int] = field(default_factory=list)
    loss_fn_inputs: dict[str, Any] = field(default_factory=dict)
    model_input: ModelInput | None = None

    def __post_init__(self) -> None:
        if self.model_input is not None and not self.tokens:
            targets = self.loss_fn_inputs.get("target_tokens")
            targets = list(getattr(targets, "data", targets) or [])
            if len(targets) != self.model_input.length:
                raise ValueError(f"Datum: model_input has {self.model_input.length} tokens but target_tokens has "
                                 f"{len(targets)}; they must be equal (targets = inputs shifted by one)")
            self.tokens = self.model_input.to_ints() + [int(targets[-1])] if targets else []
        self.tokens = [int(t) for t in self.tokens]
        if len(self.tokens) < 2:
            raise ValueError(f"Datum needs at least 2 tokens (one to read, one to predict), got {len(self.tokens)}")


@dataclass(frozen=True)
class AdamParams:
    """One ``optim_step``'s AdamW settings (Tinker's defaults; ``grad_clip_norm`` 0 = no clip)."""

    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0

    def __post_init__(self) -> None:
        if not (self.learning_rate >= 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.eps > 0
                and self.weight_decay >= 0 and self.grad_clip_norm >= 0):
            raise ValueError(f"AdamParams out of range: {self}; need learning_rate >= 0, 0 <= beta1, beta2 < 1, "
                             "eps > 0, weight_decay >= 0, grad_clip_norm >= 0")


@dataclass(frozen=True)
class SamplingParams:
    """Tinker's sampling settings (``create_sampling_client(...).sample``)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: Any = None  # accepted for compatibility; generation stops at the model's eos


@dataclass(frozen=True)
class ForwardBackwardOutput:
    """``forward`` / ``forward_backward*``: one ``{"logprobs": TensorData}`` per datum, and metrics."""

    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class OptimStepResult:
    step: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class SaveResult:
    """``save_weights_for_sampler`` / ``save_state``: ``path`` is the snapshot's identity
    (``rlstream://<run>/sampler_weights/<name>`` or ``.../state/<name>``), which the service
    resolves through the run's log; ``directory`` is where it lies on disk."""

    path: str
    directory: str
    step: int


@dataclass(frozen=True)
class SampledSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str


@dataclass(frozen=True)
class SampleResponse:
    sequences: list[SampledSequence]
