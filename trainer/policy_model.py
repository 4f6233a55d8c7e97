"""The trainer's model side: base model preparation, the reference copy, token logprobs,
and the writer of model directories (published weights and the exported model are written
by ``write_model_dir``; a LoRA policy's are merged, ``lora``; a checkpoint's HF files are
written by ``checkpoint.save_checkpoint`` with the same non-finite guard).
"""
from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from rlstream.core import weights
from rlstream.core.config import BUILTIN_MODELS, Config
from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.messages import WeightsPublished
from rlstream.sampling.prefix_cache import forward_takes
from rlstream.trainer import lora, sharded
from rlstream.trainer.precision import checkpointed_layers
from rlstream.trainer.ranks import SINGLE, Ranks, broadcast_dtypes
from rlstream.trainer.shared_prefix import shared_prefix_logits

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


def load_base(path: str, device: torch.device, ranks: Ranks = SINGLE):
    """(model, tokenizer) of the HF directory ``path``. In one process: ``from_pretrained``
    onto ``device``. Across trainer ranks only rank 0 reads the weights, onto the CPU; every
    other rank builds the same modules from the directory's config on the meta device, in
    rank 0's dtypes (no memory, no read): ``ranks.shard`` then gives each rank its shards on
    its device, filled from rank 0's tensors, so no rank but 0 ever holds the model whole, and
    rank 0's device only one module at a time while it is sharded (docs/design.md §15.94 Only rank
    0 reads the weights; the others build the model on the meta device)."""
    from rlstream.sampling.torch_setup import load_model_and_tokenizer

    if not ranks.distributed:
        return load_model_and_tokenizer(path, device)
    if ranks.rank == 0:  # onto the CPU: its shards reach the devices in ranks.shard
        model, tokenizer = load_model_and_tokenizer(path, torch.device("cpu"))
        broadcast_dtypes(model, ranks)
        return model, tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtypes = broadcast_dtypes(None, ranks)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name not in dtypes:
            raise RlstreamError(f"{path}: rank {ranks.rank} built {name!r} from the config, which rank 0's "
                                "model does not have; sharding needs the same modules on every rank")
        t.data = t.data.to(dtypes[name])  # meta: no memory
    return model, AutoTokenizer.from_pretrained(path)


def load_reference(cfg: Config, model, tokenizer, device, ranks: Ranks = SINGLE):
    """The frozen reference for the KL penalty: a copy of the base weights (or
    ``reference_model``), eval mode, no grad. Its tokenizer must be the policy's. A LoRA
    policy's reference is its own base with the adapters disabled: no second copy."""
    if cfg.reference_model is None and lora.is_lora(model):
        return lora.AdapterDisabled(model)
    if cfg.reference_model is None:
        ref = copy.deepcopy(model)
    else:
        ref, ref_tokenizer = load_base(cfg.reference_model, device, ranks)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"reference_model {cfg.reference_model!r} has a different tokenizer than the policy; "
                              "the KL penalty compares per-token logprobs, so they must share one")
    return ref.eval().requires_grad_(False)


def token_logprobs(model: torch.nn.Module, tokens_B_N: torch.Tensor, attention_B_N: torch.Tensor,
                   temperature: float, first: int = 0, *, shared_prefix: bool = False) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for t = first+1..N-1, at the sampling temperature: (B, N-1-first).

    ``shared_prefix`` (``trainer.shared_prefix``): the rows' tokens 0..``first`` (a group's
    prompt) computed once per distinct prefix where that saves work (``shared_prefix_logits``;
    docs/design.md §15.100 A group's prompt is computed once), not under gradient checkpointing.

    ``first`` > 0: the logits of positions before ``first`` are never computed (a micro-batch's
    prompt columns, which no loss reads; ``micro_batch.rows_of``): transformers' causal LMs
    apply their output head to the last ``N - first`` positions only (``logits_to_keep``), a
    model without that option has its logits sliced. At a 150k vocabulary the head and its
    float32 logits are the largest part of a forward's memory, and they grow with the prompt
    (docs/design.md §15.97 Logits only where a target is trained).

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

    A model already in eval mode (the trainer keeps its policy there) is not switched at all:
    ``eval()``/``train()`` walk every module (and transformers' override does more), ~0.15 ms
    each on the built-in model even when nothing changes.
    """
    was_training = model.training
    if was_training:
        model.eval()
    checkpointed = checkpointed_layers(model) if torch.is_grad_enabled() else []
    for layer in checkpointed:
        layer.training = True  # the flag alone: .train() would switch the layer's dropout on too
    try:
        # use_cache=False: a scoring forward has no next token to decode; the KV cache the model's
        # config asks for by default is built layer by layer and thrown away (~1% of the update on the built-in
        # model). Only to a model whose config has the setting: a plain module's forward may not take it.
        options = {"use_cache": False} if hasattr(getattr(model, "config", None), "use_cache") else {}
        keep = tokens_B_N.shape[1] - first  # positions first..N-1
        if first > 0 and keeps_logits(model):
            options["logits_to_keep"] = keep
        logits_B_T_V = shared_prefix_logits(model, tokens_B_N, attention_B_N, first) \
            if shared_prefix and not checkpointed else None
        if logits_B_T_V is None:
            # positions first..N-2 of the last ``keep``, whether the model cut its logits or (without the option) not
            logits_B_T_V = model(input_ids=tokens_B_N, attention_mask=attention_B_N,
                                 **options).logits[:, -keep:-1].float()
    finally:
        if was_training or checkpointed:
            model.train(was_training and not checkpointed)
    if temperature != 1.0:  # x / 1.0 is x: one op less forward and backward
        logits_B_T_V = logits_B_T_V / temperature
    logprobs_B_T_V = torch.log_softmax(logits_B_T_V, dim=-1)
    return logprobs_B_T_V.gather(-1, tokens_B_N[:, first + 1:, None])[..., 0]


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether ``model``'s forward takes transformers' ``logits_to_keep`` (its output head
    applied to the last positions only); a wrapper that calls another model (peft's, the LoRA
    reference: ``get_base_model``) answers for that one."""
    return forward_takes(model, "logits_to_keep")


def all_finite(model: torch.nn.Module) -> bool:
    """Whether every weight of ``model`` is finite: exactly whether the float64 sum of all of
    them is (a NaN or an infinity reaches the sum, and float64 cannot overflow on a sum of
    float32 or narrower values). One reduction per tensor and one sync, where ``isfinite``
    per tensor costs an allocation, two kernels and a sync each (0.4 ms a step on the built-in
    model, 0.1 ms this way)."""
    return tensors_finite(model.parameters())


def tensors_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """``all_finite`` of any tensors (a state dict's values)."""
    sums = [t.detach().sum(dtype=torch.float64) for t in tensors]
    return not sums or bool(torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums]).sum()))


def write_model_dir(final: Path, model, tokenizer, *, version: int,
                    extra_files: Callable[[Path], None] | None = None,
                    full: dict[str, torch.Tensor] | None = None) -> tuple[str, int]:
    """The trainer's writer of model directories (published weights, the export):
    ``weights.write_model_dir`` (atomic, sealed), after refusing weights that are
    not all finite: no worker, checkpoint or export may ever load NaN weights. A LoRA
    policy is written merged: a plain HF directory of the base architecture. ``full``: the
    gathered state dict of a sharded model (``sharded.full_state_dict``, on rank 0), which
    the directory is written from: the files the unsharded model writes."""
    if lora.is_lora(model):
        model = lora.MergedModel(model, full)
    elif full is not None:
        model = sharded.StateModel(model, full)
    if not all_finite(model):
        raise RlstreamError(nonfinite_refusal(final, version))
    return weights.write_model_dir(final, model, tokenizer, version=version, extra_files=extra_files)


def nonfinite_refusal(final: Path, version: int) -> str:
    return (f"refusing to write {final}: the weights of v{version} are not all finite (NaN or inf), nothing was "
            "written. Check base_model / init_from_checkpoint, or lower learning_rate (or set grad_clip_norm) and "
            "restart the trainer")


def weights_dir(run_dir: Path, version: int) -> Path:
    return weights.version_dir(run_dir / "weights", version)


def write_weights(model, tokenizer, run_dir: Path, version: int, keep: int | None,
                  full: dict[str, torch.Tensor] | None = None) -> WeightsPublished:
    """Write ``weights/v<version>`` and prune old versions, keeping the newest ``keep`` and
    v0 (the base the reference copy uses; ``keep`` None: prune nothing). Returns the
    ``WeightsPublished`` event that announces it; the caller publishes it once the step is
    committed (``commit.publish``). ``weight_sync.WeightSync`` calls it; ``full``: as for
    ``write_model_dir``."""
    final = weights_dir(run_dir, version)
    digest, size = write_model_dir(final, model, tokenizer, version=version, full=full)
    if keep is not None:
        prune_weights(run_dir, version, keep)
    return WeightsPublished(version=version, uri=str(final.resolve()), sha256=digest, bytes=size)


def prune_weights(run_dir: Path, version: int, keep: int) -> None:
    """Delete the weights versions past the newest ``keep`` as of ``version``; v0 stays (the
    base the reference copy uses)."""
    for old in (run_dir / "weights").glob("v*"):
        n = int(old.name[1:]) if old.name[1:].isdigit() else None
        if n is not None and 0 < n <= version - keep:
            shutil.rmtree(old, ignore_errors=True)
