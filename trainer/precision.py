"""The trainer's numbers: float32 master weights (and so float32 AdamW state), the dtype its
forwards and backwards compute in (``trainer.dtype``, through autocast), gradient
checkpointing, and the dtype published weights are written in (docs/design.md §15.40
Float32 masters, autocast compute, weights published as stored).

- Every *trainable* weight is float32, whatever the base model was saved in: AdamW's moments
  take their parameter's dtype, and a bfloat16 weight (8 significant bits) loses every update
  below about 0.2 % of itself. Frozen weights (a LoRA base) keep their stored dtype.
- ``bfloat16`` / ``float16`` run the forwards (policy, old policy, reference) under
  ``torch.autocast``: matmuls in half precision, logprobs and the loss in float32 (the
  forward casts the logits up). ``float16`` has 5 exponent bits: its backward is scaled
  (see ``optimize``); bfloat16 has float32's range and needs no scaling.
- Published weights (and the exported model) are written in the dtype the base model was
  stored in (what ``from_pretrained``, vLLM and SGLang load by default); checkpoints keep the
  float32 masters, so a resumed run continues from the very weights that crashed.
- Sharded across ranks (FSDP2, which replaces every parameter by a sharded one), the masters
  are made before sharding and published weights are cast once gathered (``sharded``), by
  parameter name: no reference to the unsharded parameters is kept.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from rlstream.trainer import sharded

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Precision:
    """``compute``: the autocast dtype (float32 = no autocast); ``masters``: the weights made
    float32, each with the dtype it was stored in."""

    compute: torch.dtype = torch.float32
    device_type: str = "cpu"
    masters: list[tuple[torch.nn.Parameter, torch.dtype]] = field(default_factory=list)
    stored: dict[str, torch.dtype] = field(default_factory=dict)  # the masters' stored dtypes, by parameter name
    gathered: bool = False  # sharded: cast the gathered weights (``stored``), not the parameters

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.compute == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.compute)

    @property
    def scales_backward(self) -> bool:
        """float16 gradients underflow below 6e-8: the backward runs on a scaled loss."""
        return self.compute == torch.float16

    def published(self) -> contextlib.AbstractContextManager:
        """The masters in their stored dtypes while a published directory is written (sharded: the
        full weights gathered inside the block come out in them)."""
        if self.gathered:
            return sharded.gathered_as(self.stored)
        return stored_dtypes(self.masters)

    def sharded(self) -> Precision:
        """This precision once the model is sharded: the parameters it recorded are gone (FSDP2
        made new ones); published weights are cast by name as they are gathered."""
        return Precision(self.compute, self.device_type, [], dict(self.stored), gathered=True)


def prepare(model: torch.nn.Module, dtype: str, device: torch.device, gradient_checkpointing: bool) -> Precision:
    """Make ``model``'s trainable weights float32 masters and switch gradient checkpointing
    on when asked. Call it once the model is final (after any LoRA wrap: only trainable
    weights become float32)."""
    masters = [(p, p.dtype) for p in model.parameters()
               if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32]
    kept = {id(p) for p, _ in masters}
    stored = {name: p.dtype for name, p in model.named_parameters(remove_duplicate=False) if id(p) in kept}
    for p, _ in masters:
        p.data = p.data.float()
    if gradient_checkpointing:
        enable_checkpointing(model)
    return Precision(DTYPES[dtype], device.type, masters, stored)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """transformers' activation checkpointing (``gradient_checkpointing_enable`` before v5.x
    renamed it). It engages only in layers in training mode: ``token_logprobs`` flags them."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


@contextlib.contextmanager
def stored_dtypes(masters: list[tuple[torch.nn.Parameter, torch.dtype]]) -> Iterator[None]:
    """Each master cast to its stored dtype inside the block, its float32 values restored
    exactly after (one extra copy of them in the stored dtype meanwhile)."""
    saved = [p.data for p, _ in masters]
    try:
        for p, dtype in masters:
            p.data = p.data.to(dtype)
        yield
    finally:
        for (p, _), data in zip(masters, saved):
            p.data = data
