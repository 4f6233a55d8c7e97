"""The trainer's model side: base model preparation, the reference copy, token logprobs,
and the one writer of model directories (published weights, checkpoints and the exported
model are all written by ``write_model_dir``; a LoRA policy's are merged, ``lora``).
"""
from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from rlstream.core import weights
from rlstream.core.config import BUILTIN_MODELS, Config
from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.messages import WeightsPublished
from rlstream.trainer import lora
from rlstream.trainer.precision import checkpointed_layers

log = logging.getLogger(__name__)


def base_model_path(cfg: Config, run_dir: Path) -> Path:
    """The HF directory the run starts from; a built-in model (``builtin:tiny``,
    ``builtin:tiny-h64``) is built into the run dir."""
    if cfg.base_model in BUILTIN_MODELS:
        from rlstream.builtin.tiny_model import save_tiny_model

        return save_tiny_model(run_dir / "base_model", seed=cfg.seed, name=cfg.base_model)
    path = Path(cfg.base_model)
    if not (path / "config.json").is_file():
        raise ConfigError(f"base_model {cfg.base_model!r} is not an HF model directory (no config.json)")
    return path


def load_reference(cfg: Config, model, tokenizer, device):
    """The frozen reference for the KL penalty: a copy of the base weights (or
    ``reference_model``), eval mode, no grad. Its tokenizer must be the policy's. A LoRA
    policy's reference is its own base with the adapters disabled: no second copy."""
    if cfg.reference_model is None and lora.is_lora(model):
        return lora.AdapterDisabled(model)
    if cfg.reference_model is None:
        ref = copy.deepcopy(model)
    else:
        from rlstream.sampling.torch_setup import load_model_and_tokenizer

        ref, ref_tokenizer = load_model_and_tokenizer(cfg.reference_model, device)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"reference_model {cfg.reference_model!r} has a different tokenizer than the policy; "
                              "the KL penalty compares per-token logprobs, so they must share one")
    return ref.eval().requires_grad_(False)


def token_logprobs(model: torch.nn.Module, tokens_B_N: torch.Tensor, attention_B_N: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for t = 1..N-1, at the sampling temperature: (B, N-1).

    The forward runs with dropout off (eval mode for the call, the caller's mode restored
    after; autograd is unaffected by eval mode). The RL objective is defined on the
    deterministic policy the workers sample from (they generate in eval mode): with dropout
    on, old and new logprobs would use different masks (ratio != 1 and the clip firing
    before any update), the TIS weight exp(old - inf) would measure dropout noise, and the
    reference KL (reference in eval) would not start at 0.

    With gradient checkpointing (``trainer.gradient_checkpointing``) transformers checkpoints
    only layers in training mode, and the backward replays each layer in the modes the
    modules have *then*: so the decoder layers alone are flagged as training (their
    submodules, dropout included, stay in eval), and the model is left in eval mode for the
    caller's backward instead of restored.
    """
    was_training = model.training
    model.eval()
    checkpointed = checkpointed_layers(model) if torch.is_grad_enabled() else []
    for layer in checkpointed:
        layer.training = True  # the flag alone: .train() would switch the layer's dropout on too
    try:
        logits_B_T_V = model(input_ids=tokens_B_N, attention_mask=attention_B_N).logits[:, :-1].float()
    finally:
        model.train(was_training and not checkpointed)
    logprobs_B_T_V = torch.log_softmax(logits_B_T_V / temperature, dim=-1)
    return logprobs_B_T_V.gather(-1, tokens_B_N[:, 1:, None])[..., 0]


def all_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def write_model_dir(final: Path, model, tokenizer, *, version: int,
                    extra_files: Callable[[Path], None] | None = None) -> tuple[str, int]:
    """The trainer's writer of model directories (published weights, checkpoints, the
    export): ``weights.write_model_dir`` (atomic, sealed), after refusing weights that are
    not all finite: no worker, checkpoint or export may ever load NaN weights. A LoRA
    policy is written merged: a plain HF directory of the base architecture."""
    if lora.is_lora(model):
        model = lora.MergedModel(model)
    if not all_finite(model):
        raise RlstreamError(f"refusing to write {final}: the weights of v{version} are not all finite (NaN or "
                            "inf), nothing was written. Check base_model / init_from_checkpoint, or lower "
                            "learning_rate (or set grad_clip_norm) and restart the trainer")
    return weights.write_model_dir(final, model, tokenizer, version=version, extra_files=extra_files)


def weights_dir(run_dir: Path, version: int) -> Path:
    return weights.version_dir(run_dir / "weights", version)


def write_weights(model, tokenizer, run_dir: Path, version: int, keep: int) -> WeightsPublished:
    """Write ``weights/v<version>`` and prune old versions, keeping the newest ``keep`` and
    v0 (the base the reference copy uses). Returns the ``WeightsPublished`` event that
    announces it; the caller publishes it once the step is committed (``commit.publish``)."""
    final = weights_dir(run_dir, version)
    digest, size = write_model_dir(final, model, tokenizer, version=version)
    for old in final.parent.glob("v*"):
        n = int(old.name[1:]) if old.name[1:].isdigit() else None
        if n is not None and 0 < n <= version - keep:
            shutil.rmtree(old, ignore_errors=True)
    return WeightsPublished(version=version, uri=str(final.resolve()), sha256=digest, bytes=size)
