"""A micro-batch's shared prompts computed once in the trainer's forward (``trainer.shared_prefix``;
docs/design.md §15.100 A group's prompt is computed once).

A group's G completions share their prompt, and a GRPO batch holds each prompt G times: a plain
forward computes the prompt's layers G times over. Here the rows' first ``first + 1`` tokens (up
to the first position whose logits a trained target reads) go through the model once per
distinct prefix, its key/value cache is repeated to every row that shares it (``index_select``:
differentiable, the rows' gradients add up in the prefix's), and the rest of each row runs on
top of it. The logits are those of the plain forward at the same positions, to float rounding:
the same weights meet the same tokens, in other batch shapes. The gradient is the same sum.

Used only where it saves work: a transformers causal LM (a forward that takes a cache and
returns one, of attention's keys and values in every layer) with at least two rows per prefix
on average and a prefix of two tokens or more.
Otherwise, and under gradient checkpointing (transformers builds no cache for checkpointed
layers), the caller runs its plain forward.
"""
from __future__ import annotations

import functools
import inspect
import logging
import weakref

import torch

log = logging.getLogger(__name__)


def shared_prefix_logits(model: torch.nn.Module, tokens_B_N: torch.Tensor, attention_B_N: torch.Tensor,
                         first: int, keeps_logits: bool) -> torch.Tensor | None:
    """Logits (B, N - 1 - first, V) of positions ``first .. N - 2`` (what ``token_logprobs``
    reads), the rows' common prefix ``0 .. first`` computed once per distinct prefix; None when
    that would not save work or ``model`` cannot take a cache (the caller's plain forward then).

    A prefix is its tokens and its attention mask together: a real token that equals the pad id
    never shares with padding. A row shorter than the prefix (one with no trained target) has
    padding in its prefix; the masks keep it out of every real row's attention, as in the plain
    forward. ``keeps_logits``: the prefix's forward may ask for its last position's logits
    only (transformers' ``logits_to_keep``)."""
    B, N = tokens_B_N.shape
    S = first + 1  # the prefix: tokens 0 .. first; the logits of its last position are the first read
    cache_arg = cache_argument(model)
    if cache_arg is None or B < 2 or S < 2 or S > N - 1:
        return None
    key_B_K = torch.cat([tokens_B_N[:, :S], attention_B_N[:, :S]], 1)
    prefixes_U_K, row_prefix_B = torch.unique(key_B_K, dim=0, return_inverse=True)
    if 2 * prefixes_U_K.shape[0] > B:  # fewer than two rows a prefix: two forwards would cost more than one
        return None
    options = {"use_cache": True} | ({"logits_to_keep": 1} if keeps_logits else {})
    out = model(input_ids=prefixes_U_K[:, :S], attention_mask=prefixes_U_K[:, S:], **options)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "reorder_cache"):
        log.warning("trainer.shared_prefix: %s returned no key/value cache; running the plain forward",
                    type(model).__name__)
        return None
    logits_B_1_V = out.logits[:, -1:][row_prefix_B]
    if S == N - 1:  # nothing after the prefix is read (one-token completions)
        return logits_B_1_V.float()
    cache.reorder_cache(row_prefix_B)  # each row's copy of its prefix's keys and values
    rest = model(input_ids=tokens_B_N[:, S:N - 1], attention_mask=attention_B_N[:, :N - 1], use_cache=True,
                 **{cache_arg: cache})
    return torch.cat([logits_B_1_V, rest.logits], 1).float()


def cache_argument(model: torch.nn.Module) -> str | None:
    """The name under which ``model``'s forward takes a key/value cache (transformers 5.x:
    ``cache``, earlier ``past_key_values``), None when it takes none, its config keeps no cache
    setting (not a transformers causal LM), or its cache holds more than attention's keys and
    values (``keys_and_values_only``). A wrapper that calls another model (peft's, and the LoRA
    reference ``lora.AdapterDisabled``, which has no config of its own) answers for that one."""
    while hasattr(model, "get_base_model") and model.get_base_model() is not model:
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if not hasattr(config, "use_cache"):
        return None
    if model not in _KEYS_AND_VALUES:  # once a model: building the cache's layers costs ~7 us each
        _KEYS_AND_VALUES[model] = keys_and_values_only(config)
    return _cache_parameter(type(model)) if _KEYS_AND_VALUES[model] else None


_KEYS_AND_VALUES: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def keys_and_values_only(config) -> bool:
    """Whether the cache transformers builds for ``config`` holds attention's keys and values in
    every layer (full or sliding window), the cache whose continuation is checked here. A layer
    of recurrent state (Mamba's, a hybrid's linear attention) is not: Mamba's forward, for one,
    reads its attention mask as the new tokens' alone, not the cache's and theirs."""
    from transformers import cache_utils

    recurrent = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())  # () before transformers 5.x had it
    layers = cache_utils.DynamicCache(config=config).layers  # the layer types the model's own cache gets
    return all(isinstance(layer, cache_utils.DynamicLayer) and not isinstance(layer, recurrent) for layer in layers)


@functools.lru_cache(maxsize=None)
def _cache_parameter(cls: type) -> str | None:
    parameters = inspect.signature(cls.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)
