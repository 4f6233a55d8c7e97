"""The SDK's training client and reference client: the policy lives in the caller's process
(docs/design.md §15.65 The SDK trains in the caller's process).

``forward_backward_custom(data, objective)`` runs one forward over the data, hands the
objective one differentiable tensor of next-token logprobs per datum and backpropagates its
loss at once: no round trip, no second forward (a remote trainer needs a forward, the
objective's gradient sent back, and a weighted backward). Gradients accumulate until
``optim_step``. Model loading, LoRA, float32 masters, the optimizer, clipping, the non-finite
guard, the model-directory writer and train-state checkpoints are the trainer's own
(``rlstream.trainer``); every step, snapshot and state is an event in the run's log.
"""
from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlstream.core import weights
from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.messages import OptimStepped, SamplerSaved, StateLoaded, StateSaved
from rlstream.core.metrics import MetricsLog
from rlstream.sampling.torch_setup import load_model_and_tokenizer
from rlstream.sdk.ledger import check_name, identity, parse_identity
from rlstream.sdk.session import Session
from rlstream.sdk.types import AdamParams, Datum, Done, ForwardBackwardOutput, OptimStepResult, SaveResult, TensorData
from rlstream.trainer import lora
from rlstream.trainer.checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from rlstream.trainer.optimize import clip_and_step, make_optimizer
from rlstream.trainer.policy_model import all_finite, token_logprobs, weights_dir, write_model_dir
from rlstream.trainer.precision import Precision, prepare
from rlstream.trainer.schedule import due

log = logging.getLogger(__name__)
AUTO_STATE = "auto-step-{step:06d}"  # the states dcp_save_interval saves
Objective = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]


def datum_logprobs(model, data: Sequence[Datum], pad_id: int, precision: Precision,
                   device: torch.device) -> list[torch.Tensor]:
    """One forward over ``data`` (right-padded): for each datum the log-probability of
    tokens[1:] given what precedes them, ``len(tokens) - 1`` values, differentiable when grad
    is enabled (temperature 1, dropout off: ``token_logprobs``)."""
    if not data or not all(isinstance(d, Datum) for d in data):
        raise TypeError("data must be a non-empty list of rlstream.sdk.Datum(tokens=[...], loss_fn_inputs={...})")
    lengths = [len(d.tokens) for d in data]
    vocab = getattr(model, "policy", model).get_input_embeddings().num_embeddings  # AdapterDisabled wraps its policy
    top = max(max(d.tokens) for d in data)
    if top >= vocab or min(min(d.tokens) for d in data) < 0:
        raise ValueError(f"a datum holds token id {top} outside the model's vocabulary (size {vocab}): tokenize with "
                         "the service's tokenizer (training_client.get_tokenizer())")
    tokens_B_N = torch.full((len(data), max(lengths)), pad_id, dtype=torch.long)
    attention_B_N = torch.zeros_like(tokens_B_N)
    for i, d in enumerate(data):
        tokens_B_N[i, :lengths[i]] = torch.tensor(d.tokens)
        attention_B_N[i, :lengths[i]] = 1
    with precision.autocast():
        logprobs_B_T = token_logprobs(model, tokens_B_N.to(device), attention_B_N.to(device), 1.0)
    return [logprobs_B_T[i, :n - 1] for i, n in enumerate(lengths)]


def check_loss_fn(loss_fn: str) -> None:
    if loss_fn != "cross_entropy":
        raise ValueError(f"loss_fn {loss_fn!r}: the SDK's built-in loss is 'cross_entropy'; for any other "
                         "objective use forward_backward_custom(data, objective)")


def cross_entropy(data: list[Datum], logprobs_list: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Tinker's ``cross_entropy``: -sum(weights * logprobs), ``loss_fn_inputs["weights"]``
    (one per predicted token) defaulting to 1."""
    total = logprobs_list[0].new_zeros(())
    for d, lp in zip(data, logprobs_list):
        w = d.loss_fn_inputs.get("weights")
        w = torch.ones_like(lp) if w is None else torch.as_tensor(getattr(w, "data", w), dtype=lp.dtype)
        total = total - (w * lp).sum()
    return total, {"loss:sum": float(total.detach())}


def _outputs(logprobs_list: list[torch.Tensor]) -> list[dict[str, TensorData]]:
    return [{"logprobs": TensorData.from_torch(lp)} for lp in logprobs_list]


class TrainingClient:
    """The policy: ``forward``, ``forward_backward(_custom)``, ``optim_step``,
    ``save_weights_for_sampler``, ``save_state``, ``load_state(_with_optimizer)``."""

    def __init__(self, session: Session, tokenizer):
        cfg, self.session, self.tokenizer = session.cfg, session, tokenizer
        model, _ = load_model_and_tokenizer(str(session.base_path()), session.device)
        model.train()
        if cfg.lora_rank:  # adapters train, the base stays frozen (§15.38 LoRA through peft, merged when published)
            model = lora.wrap(model, cfg)
        self.model = model
        self.base_fingerprint = lora.base_fingerprint(model, session.base_path())
        self.precision = prepare(model, cfg.trainer.dtype, session.device, cfg.trainer.gradient_checkpointing)
        if self.precision.scales_backward:
            raise ConfigError("trainer.dtype = 'float16' needs a scaled backward, which the SDK's custom objectives "
                              "cannot be given; use 'bfloat16' or 'float32'")
        self.optimizer = make_optimizer(model, cfg)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.device, self.step = session.device, 0
        self._reset_accumulation()

    def _reset_accumulation(self) -> None:
        self._sums: dict[str, float] = defaultdict(float)
        self._calls, self._datums, self._tokens, self._finite = 0, 0, 0, True

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def inner(self) -> TrainingClient:
        """Itself: the seed's ``policy.inner`` (its reconnectable wrapper's training client)."""
        return self

    # ----------------------------------------------------------------- forward / backward
    def forward(self, data: Sequence[Datum], loss_fn: str = "cross_entropy") -> Done[ForwardBackwardOutput]:
        """The policy's per-datum next-token logprobs, without a graph."""
        check_loss_fn(loss_fn)
        with torch.no_grad():
            logprobs_list = datum_logprobs(self.model, data, self.pad_id, self.precision, self.device)
        return Done(ForwardBackwardOutput(_outputs(logprobs_list)))

    def forward_backward(self, data: Sequence[Datum], loss_fn: str = "cross_entropy") -> Done[ForwardBackwardOutput]:
        check_loss_fn(loss_fn)
        return self.forward_backward_custom(data, cross_entropy)

    def forward_backward_custom(self, data: Sequence[Datum], objective: Objective) -> Done[ForwardBackwardOutput]:
        """``objective(data, logprobs_list) -> (loss, metrics)`` runs here, on tensors of the
        live graph; its loss's gradients add to those since the last ``optim_step``. A
        non-finite loss is not backpropagated and makes the next ``optim_step`` a skipped one
        (docs/design.md §15.33 Non-finite steps are skipped, never published)."""
        data = list(data)
        logprobs_list = datum_logprobs(self.model, data, self.pad_id, self.precision, self.device)
        loss, metrics = objective(data, logprobs_list)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise TypeError("the objective must return (loss, metrics) with loss a scalar tensor computed from the "
                            f"logprobs it was given (got {type(loss).__name__})")
        finite = bool(torch.isfinite(loss.detach()))
        if finite:
            loss.backward()
        else:
            log.warning("step %d: the objective's loss is %s: this step's gradients will be dropped", self.step + 1,
                        float(loss.detach()))
        self._finite = self._finite and finite
        metrics = {**{k: float(v) for k, v in (metrics or {}).items()}, "loss": float(loss.detach())}
        for key, value in metrics.items():
            self._sums[key] += value
        self._calls, self._datums = self._calls + 1, self._datums + len(data)
        self._tokens += sum(len(d.tokens) for d in data)
        return Done(ForwardBackwardOutput(_outputs(logprobs_list), metrics))

    # ----------------------------------------------------------------- the update
    def optim_step(self, params: AdamParams | None = None) -> Done[OptimStepResult]:
        """One AdamW step with ``params`` on the accumulated gradients, then an
        ``OptimStepped`` event with the step's metrics (the objective's, averaged over the
        ``forward_backward`` calls since the last step)."""
        params = params or AdamParams(learning_rate=self.session.cfg.learning_rate)
        if self._calls == 0:
            raise RlstreamError("optim_step with no forward_backward since the last step: there is no gradient to "
                                "apply; call forward_backward_custom(data, objective) first")
        for group in self.optimizer.param_groups:
            group.update(lr=params.learning_rate, betas=(params.beta1, params.beta2), eps=params.eps,
                         weight_decay=params.weight_decay)
        grad_norm, applied = clip_and_step(self.model, self.optimizer, self._finite, params.grad_clip_norm or None)
        self.optimizer.zero_grad(set_to_none=True)
        if applied and not all_finite(self.model):
            raise RlstreamError(f"optim_step {self.step + 1} made weights non-finite at learning_rate "
                                f"{params.learning_rate:g}; nothing was logged. Load a saved state "
                                "(load_state_with_optimizer) and lower the learning rate or set grad_clip_norm")
        self.step += 1
        metrics = {f"train/{k}" if "/" not in k else k: v / self._calls for k, v in self._sums.items()}
        metrics.update({"train/grad_norm": grad_norm, "train/lr": params.learning_rate,
                        "train/nonfinite_skipped": int(not applied), "train/datums": self._datums,
                        "train/tokens": self._tokens, "train/forward_backward_calls": self._calls})
        self._reset_accumulation()
        self.session.record(OptimStepped(step=self.step, metrics=metrics))
        MetricsLog(self.session.run_dir / "metrics.jsonl").write({"step": self.step, **metrics})  # as `main` writes
        if due(self.session.cfg.dcp_save_interval, self.step):  # bounds what a crash loses to the interval
            self.save_state(AUTO_STATE.format(step=self.step))
        return Done(OptimStepResult(self.step, metrics))

    # ----------------------------------------------------------------- snapshots and states
    def save_weights_for_sampler(self, name: str) -> Done[SaveResult]:
        """Seal the current weights (a LoRA policy's merged) in ``weights/v<N>`` for samplers;
        ``.result().path`` is the snapshot's identity for ``create_deployment_sampler``."""
        s = self.session
        check_name(name, "sampler snapshot")
        s.lease.confirm()  # the files below are this run's trainer's to write
        version = s.ledger.follow(s.r, s.run_id).last_version + 1
        final = weights_dir(s.run_dir, version)
        with self.precision.published():  # as the trainer publishes: the base model's stored dtypes
            digest, size = write_model_dir(final, self.model, self.tokenizer, version=version)
        s.record(SamplerSaved(name=name, step=self.step, version=version, sha256=digest, bytes=size))
        return Done(SaveResult(identity(s.run_id, "sampler_weights", name), str(final), self.step))

    def save_state(self, name: str) -> Done[SaveResult]:
        """A train-state checkpoint (weights or adapter, AdamW moments, RNG) by name."""
        s = self.session
        final = weights.child_dir(s.run_dir / "states", check_name(name, "state"))
        s.lease.confirm()
        state = CheckpointState(step=self.step, version=s.ledger.last_version, events_cursor=s.ledger.cursor,
                                rows_admitted=0, base_fingerprint=self.base_fingerprint)
        save_checkpoint(s.run_dir, state, self.model, self.tokenizer, self.optimizer, final=final)
        manifest = json.loads((final / weights.MANIFEST).read_text())
        s.record(StateSaved(name=name, step=self.step, sha256=manifest["sha256"], bytes=manifest["bytes"]))
        return Done(SaveResult(identity(s.run_id, "state", name), str(final), self.step))

    def load_state_with_optimizer(self, name: str) -> Done[SaveResult]:
        """Weights, optimizer and RNG of the saved state ``name`` (or its identity); the step
        count continues from the state's."""
        return self._load(name, with_optimizer=True)

    def load_state(self, name: str) -> Done[SaveResult]:
        """The weights of state ``name``, with a fresh optimizer."""
        return self._load(name, with_optimizer=False)

    def _load(self, name: str, *, with_optimizer: bool) -> Done[SaveResult]:
        s = self.session
        name = parse_identity(name, s.run_id, "state")
        saved = s.ledger.follow(s.r, s.run_id).state(name, s.run_id)
        path = weights.child_dir(s.run_dir / "states", name)
        try:
            weights.verify(path, saved.sha256)
        except (OSError, ValueError) as exc:
            raise RlstreamError(f"state {name!r} of run {s.run_id} cannot be loaded: {exc}. Load another one "
                                "(the run's log lists them: StateSaved events)") from None
        restored = load_checkpoint(path, self.model, self.optimizer, s.device, self.base_fingerprint)
        if not with_optimizer:
            self.optimizer = make_optimizer(self.model, s.cfg)
        self.step = restored.step
        self._reset_accumulation()
        self.optimizer.zero_grad(set_to_none=True)
        s.record(StateLoaded(name=name, step=self.step, with_optimizer=with_optimizer))
        log.info("run %s: loaded state %s (step %d%s)", s.run_id, name, self.step,
                 "" if with_optimizer else ", fresh optimizer")
        return Done(SaveResult(identity(s.run_id, "state", name), str(path), self.step))


class ReferenceClient:
    """Frozen reference logprobs (``forward(data, "cross_entropy")``): a LoRA policy's own base
    with its adapters disabled (no second copy), else a frozen copy of the base model."""

    def __init__(self, model, pad_id: int, precision: Precision, device: torch.device):
        self.model, self.pad_id, self.precision, self.device = model, pad_id, precision, device

    def forward(self, data: Sequence[Datum], loss_fn: str = "cross_entropy") -> Done[ForwardBackwardOutput]:
        check_loss_fn(loss_fn)
        with torch.no_grad():
            logprobs_list = datum_logprobs(self.model, data, self.pad_id, self.precision, self.device)
        return Done(ForwardBackwardOutput(_outputs(logprobs_list)))


def frozen_base(session: Session, base_model: str | None, tokenizer) -> Any:
    """The base model (``base_model`` or the service's), eval mode, no grad; its tokenizer must
    be the policy's (a KL compares per-token logprobs)."""
    if base_model is None or base_model == session.cfg.base_model:
        path = session.base_path()
    else:
        from rlstream.trainer.policy_model import base_model_path

        path = base_model_path(session.cfg.model_copy(update={"base_model": base_model}), session.run_dir)
    model, ref_tokenizer = load_model_and_tokenizer(str(path), session.device)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"reference base_model {base_model!r} has another tokenizer than the policy; reference "
                          "logprobs are compared token by token, so they must share one")
    return model.eval().requires_grad_(False)
