"""A batch's repeated prefixes through a transformers model once: the distinct prefixes' forward
with a key/value cache, which the caller repeats to every row that shares one
(``Cache.reorder_cache``). A GRPO batch holds each prompt G times. The trainer's forward
(``trainer/shared_prefix.py``, ``trainer.shared_prefix``) and the local sampler's ``generate``
(``local.py``, ``workers.shared_prefix``) build on it (docs/design.md §15.100 A group's prompt is
computed once).
"""
from __future__ import annotations

import functools
import inspect
import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class Prefilled:
    """The distinct prefixes' forward: its ``cache`` (one row per distinct prefix), ``row_prefix_B``
    (each row's prefix), the forward's logits (of its last position only where the model could
    cut them), and the name its forward takes a cache by."""

    cache: Any
    row_prefix_B: torch.Tensor
    logits_U_L_V: torch.Tensor
    cache_arg: str

    def cache_for_rows(self) -> Any:
        """The cache repeated to every row (an ``index_select``: differentiable, each row's
        gradient adds into its prefix's). In place: call it once."""
        self.cache.reorder_cache(self.row_prefix_B)
        return self.cache


def prefill_distinct(model: torch.nn.Module, tokens_B_S: torch.Tensor, attention_B_S: torch.Tensor, *,
                     last_logits_only: bool = False, left_padded: bool = False) -> Prefilled | None:
    """The forward of the distinct rows of ``tokens_B_S`` (a prefix is its tokens and its mask
    together: a real token equal to the pad id never shares with padding), with a cache; None
    when that would not save work (fewer than two rows a prefix on average, or no prefix) or
    ``model`` takes no cache. ``left_padded``: positions count real tokens only, as transformers'
    ``generate`` numbers a left-padded prompt's. ``last_logits_only``: the caller reads the last
    position's logits alone (the forward computes only those where it takes ``logits_to_keep``)."""
    B, S = tokens_B_S.shape
    cache_arg = cache_argument(model)
    if cache_arg is None or B < 2 or S < 1:
        return None
    key_B_K = torch.cat([tokens_B_S, attention_B_S], 1)
    prefixes_U_K, row_prefix_B = torch.unique(key_B_K, dim=0, return_inverse=True)
    if 2 * prefixes_U_K.shape[0] > B:  # two forwards would cost more than the one they replace
        return None
    tokens_U_S, attention_U_S = prefixes_U_K[:, :S], prefixes_U_K[:, S:]
    options: dict[str, Any] = {"use_cache": True}
    if left_padded:
        options["position_ids"] = (attention_U_S.cumsum(-1) - 1).clamp(min=0)
    if last_logits_only and forward_takes(model, "logits_to_keep"):
        options["logits_to_keep"] = 1
    out = model(input_ids=tokens_U_S, attention_mask=attention_U_S, **options)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "reorder_cache"):
        log.warning("shared_prefix: %s returned no key/value cache; running the plain forward", type(model).__name__)
        return None
    return Prefilled(cache, row_prefix_B, out.logits, cache_arg)


def cache_argument(model: torch.nn.Module) -> str | None:
    """The name under which ``model``'s forward takes a key/value cache (transformers 5.x:
    ``cache``, earlier ``past_key_values``), None when it takes none, its config keeps no cache
    setting (not a transformers causal LM), its cache holds more than attention's keys and
    values (``keys_and_values_only``), or its rotary embedding depends on the forward's length
    (``rope_by_position``). A wrapper that calls another model (peft's, and the LoRA
    reference ``lora.AdapterDisabled``, which has no config of its own) answers for that one."""
    model = unwrapped(model)
    config = getattr(model, "config", None)
    if not hasattr(config, "use_cache"):
        return None
    if model not in _SHAREABLE:  # once a model: building the cache's layers costs ~7 us each
        _SHAREABLE[model] = keys_and_values_only(config) and rope_by_position(config)
    if not _SHAREABLE[model]:
        return None
    return next((name for name in ("cache", "past_key_values") if _forward_takes(type(model), name)), None)


_SHAREABLE: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def keys_and_values_only(config: Any) -> bool:
    """Whether the cache transformers builds for ``config`` holds attention's keys and values in
    every layer (full or sliding window), the cache whose continuation is checked here. A layer
    of recurrent state (Mamba's, a hybrid's linear attention) is not: Mamba's forward, for one,
    reads its attention mask as the new tokens' alone, not the cache's and theirs. Nor is a cache
    transformers cannot build from ``config`` (a layer type it has no dynamic layer for)."""
    from transformers import cache_utils

    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())  # () before transformers 5.x had it
    try:
        layers = cache_utils.DynamicCache(config=config).layers  # the layer types the model's own cache gets
    except Exception as exc:  # a layer type it has no dynamic layer for (DeepSeek-V4's): the model builds its own
        log.debug("shared_prefix: no dynamic cache for %s (%r); the plain forward", type(config).__name__, exc)
        return False
    return all(isinstance(layer, cache_utils.DynamicLayer) and not isinstance(layer, recurrent) for layer in layers)


LENGTH_SCALED_ROPE = ("dynamic", "longrope")  # scaled by the longest position the forward sees


def rope_by_position(config: Any) -> bool:
    """Whether ``config``'s rotary embedding rotates a position the same whatever else the
    forward holds. Dynamic NTK scaling and LongRoPE pick their frequencies from the forward's
    own length: past the original context, a prefix's forward would rotate its keys for the
    prefix's length, the plain forward for the whole row's."""
    for name in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, name, None)
        if isinstance(rope, dict) and (rope.get("rope_type") or rope.get("type")) in LENGTH_SCALED_ROPE:
            return False
    return True


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model a wrapper's forward runs (peft's, the LoRA reference: ``get_base_model``)."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    return model


def forward_takes(model: torch.nn.Module, name: str) -> bool:
    """Whether ``model``'s forward takes the argument ``name``; a wrapper answers for the model
    it runs (``unwrapped``)."""
    return _forward_takes(type(unwrapped(model)), name)


@functools.lru_cache(maxsize=None)
def _forward_takes(cls: type, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters
