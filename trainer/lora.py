"""LoRA (``lora_rank > 0``) through peft: wrapping the policy, the reference as the base
with adapters disabled, the merged weights that workers and the export load, and the
adapter files a checkpoint holds (docs/design.md §15.38 LoRA through peft, merged when
published).

The training model is a ``peft.PeftModel`` whose base weights stay frozen and untouched:
merging never happens in place (``merge_adapter`` then ``unmerge_adapter`` would leave
rounding drift in the base, so a resumed run would not reproduce the one that crashed).
A published directory is the base architecture's ``save_pretrained`` with a merged state
dict computed on the side (W + scale * B @ A per adapted layer, peft's ``get_delta_weight``):
one extra copy of the adapted weights, in host memory, while it is written.

peft is imported only by a LoRA run: ``is_lora`` asks ``sys.modules`` instead of importing it.
"""
from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from rlstream.core.config import Config
from rlstream.core.errors import RlstreamError
from rlstream.core.weights import weights_fingerprint

ADAPTER = "default"  # peft's adapter name; a run trains exactly one adapter
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's own file names


def is_lora(model) -> bool:
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def base_fingerprint(model, base: Path) -> str | None:
    """What a LoRA ``model``'s checkpoints record of the base directory ``base`` its frozen
    weights came from (``weights.weights_fingerprint``); None for a full fine-tuning model,
    whose checkpoints hold every weight."""
    return weights_fingerprint(base) if is_lora(model) else None


def lora_alpha(cfg: Config) -> int:
    """``lora_alpha`` unset = 2 x rank (a scale alpha / r of 2 whatever the rank)."""
    return cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank


def wrap(model, cfg: Config):
    """The policy as a peft model: LoRA adapters (B = 0, so it starts as the base) on
    ``lora_target_modules``, every base weight frozen. Dropout stays 0: the trainer's
    logprobs are those of the deterministic policy the workers sample from (docs/design.md
    §15.19 The trainer computes logprobs with dropout off)."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(r=cfg.lora_rank, lora_alpha=lora_alpha(cfg), target_modules=cfg.lora_target_modules,
                        lora_dropout=0.0, bias="none", task_type=TaskType.CAUSAL_LM)
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = embeddings.weight if head is not None and head.weight is embeddings.weight else None
    try:
        with warnings.catch_warnings():
            # a transformers 5 deprecated alias peft calls; the tied-layer case is refused below
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*tied layer is part of the adapter", category=UserWarning)
            wrapped = get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target module the model does not have
        raise RlstreamError(f"LoRA cannot wrap base_model: {exc}. Check lora_target_modules (module names of "
                            "the base model, or \"all-linear\")") from None
    shared = sorted(name for name, layer in _lora_layers(wrapped).items() if layer.get_base_layer().weight is tied)
    if shared:  # one merged tensor cannot be both the adapted layer and its unadapted twin
        raise RlstreamError(f"lora_target_modules adapts {shared}, whose weight base_model ties to its input "
                            "embeddings / output head (tie_word_embeddings): the merged weights could not "
                            "publish both. Leave it out of lora_target_modules (\"all-linear\" never adapts it)")
    return wrapped


class AdapterDisabled(torch.nn.Module):
    """The KL reference of a LoRA run: the policy's own base weights, run with its adapters
    disabled (no second copy of the model). Called like a model by ``token_logprobs``; the
    policy is held, not registered, so ``eval()``/``train()`` on this wrapper leave the
    policy's mode alone and the forward switches dropout off itself."""

    def __init__(self, policy):
        super().__init__()
        self.__dict__["policy"] = policy  # not a submodule: its parameters are not the reference's

    def get_base_model(self):
        """The model the forward runs (peft's name for it): what ``policy_model.keeps_logits`` asks."""
        return self.policy.get_base_model()

    def forward(self, **inputs):
        was_training = self.policy.training
        if was_training:  # the trainer keeps its policy in eval mode: no switch (each walks every module)
            self.policy.eval()
        try:
            with self.policy.disable_adapter():
                return self.policy(**inputs)
        finally:
            if was_training:
                self.policy.train()


def _lora_layers(model) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The base architecture's state dict with every adapter merged in, keys as the base
    model names them, each weight in the dtype the base stores it in (adapters are float32:
    the sum is taken in float32, then cast); the training model is not modified."""
    layers = _lora_layers(model)
    adapter_keys = {f"{name}.{p}" for name, m in layers.items() for p, _ in m.named_parameters()
                    if not p.startswith("base_layer.")}
    out = {key.replace(".base_layer.", "."): t for key, t in model.get_base_model().state_dict().items()
           if key not in adapter_keys}
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.get_base_layer().weight
            out[f"{name}.weight"] = (base.float() + layer.get_delta_weight(ADAPTER).float()).to(base.dtype).cpu()
    return out


def merged_from_full(model, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``merged_state_dict`` of a sharded LoRA policy, from its gathered full state dict
    (``sharded.full_state_dict``: names as ``model.state_dict()`` gives them): W + scale *
    B @ A per adapted layer, as peft's ``get_delta_weight`` of a linear layer computes it
    (float32 adapters), so the directory is the one the unsharded policy publishes."""
    prefix = next(name for name, m in model.named_modules() if m is model.get_base_model())
    prefix = f"{prefix}." if prefix else ""
    layers = _lora_layers(model)
    adapter = {f"{prefix}{name}.{p}" for name, m in layers.items() for p, _ in m.named_parameters()
               if not p.startswith("base_layer.")}
    out = {key[len(prefix):].replace(".base_layer.", "."): t for key, t in full.items()
           if key.startswith(prefix) and key not in adapter}
    with torch.no_grad():
        for name, layer in layers.items():
            base = full[f"{prefix}{name}.base_layer.weight"]
            a, b = full[f"{prefix}{name}.lora_A.{ADAPTER}.weight"], full[f"{prefix}{name}.lora_B.{ADAPTER}.weight"]
            delta = b.float() @ a.float()
            delta = (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[ADAPTER]
            out[f"{name}.weight"] = (base.float() + delta.to(b.dtype).float()).to(base.dtype)
    return out


class MergedModel:
    """What ``write_model_dir`` saves for a LoRA policy: a plain HF directory (config and
    merged safetensors of the base architecture) that workers and ``from_pretrained`` load
    as they load any model. ``full``: the gathered state dict of a sharded policy."""

    def __init__(self, model, full: dict[str, torch.Tensor] | None = None):
        self.base = model.get_base_model()
        self.state = merged_state_dict(model) if full is None else merged_from_full(model, full)

    def parameters(self) -> Iterator[torch.Tensor]:  # the non-finite guard looks at what is written
        return iter(self.state.values())

    def save_pretrained(self, directory: Path) -> None:
        self.base.save_pretrained(directory, state_dict=self.state)  # drops the tied lm_head, as usual


class AdapterFiles:
    """What a checkpoint of a LoRA policy holds: the adapter in peft's own format
    (``adapter_model.safetensors`` + ``adapter_config.json``, loadable with
    ``PeftModel.from_pretrained`` onto the same base); the base weights are the run's
    ``base_model``, unchanged. ``full``: the gathered state dict of a sharded policy."""

    def __init__(self, model, full: dict[str, torch.Tensor] | None = None):
        from peft import get_peft_model_state_dict

        self.model = model
        state = get_peft_model_state_dict(model, state_dict=full)
        self.state = {k: v.detach().cpu().contiguous() for k, v in state.items()}

    def parameters(self) -> Iterator[torch.Tensor]:
        return iter(self.state.values())

    def save_pretrained(self, directory: Path) -> None:
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(self.state, str(Path(directory) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        self.model.peft_config[ADAPTER].save_pretrained(str(directory))


def holds_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def load_adapter(path: Path, model, device) -> None:
    """Load a checkpoint's adapter into ``model`` in place. It must have been trained with
    this run's rank, alpha and target modules (else the weights would mean another update)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    check_adapter_config(path, model)
    state = load_file(str(path / ADAPTER_WEIGHTS), device=str(device))
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    if {k: tuple(v.shape) for k, v in state.items()} != expected:
        raise RlstreamError(f"the adapter in {path} does not fit the model (other tensors or shapes): was it "
                            "written for another base_model?")
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER)


def check_adapter_config(path: Path, model) -> None:
    """The checkpoint's adapter was trained with this run's rank, alpha and target modules (else
    its weights would mean another update): raise naming what differs."""
    saved = json.loads((path / ADAPTER_CONFIG).read_text())
    ours = model.peft_config[ADAPTER]
    theirs = {"lora_rank": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
              "target modules": sorted(saved.get("target_modules") or [])}
    mine = {"lora_rank": ours.r, "lora_alpha": ours.lora_alpha, "target modules": sorted(ours.target_modules)}
    if theirs != mine:
        diff = ", ".join(f"{k} {theirs[k]} (this run: {mine[k]})" for k in mine if theirs[k] != mine[k])
        raise RlstreamError(f"checkpoint {path} holds a LoRA adapter with {diff}; set the same lora_rank, "
                            "lora_alpha and lora_target_modules to load it, or start without the checkpoint")
