"""A micro-batch's shared prompts computed once in the trainer's forward (``trainer.shared_prefix``;
docs/design.md §15.100 A group's prompt is computed once).

A group's G completions share their prompt, and a GRPO batch holds each prompt G times: a plain
forward computes the prompt's layers G times over. Here the rows' first ``first + 1`` tokens (up
to the first position whose logits a trained target reads) go through the model once per
distinct prefix, its key/value cache is repeated to every row that shares it (``index_select``:
differentiable, the rows' gradients add up in the prefix's), and the rest of each row runs on
top of it. The logits are those of the plain forward at the same positions, to float rounding:
the same weights meet the same tokens, in other batch shapes. The gradient is the same sum.

Used only where it saves work and the continuation is the plain forward's: a transformers causal
LM whose forward takes a cache of attention's keys and values alone and whose rotary embedding
does not depend on the forward's length (``rlstream.sampling.prefix_cache.cache_argument``), at
least two rows per prefix on average, a prefix of two tokens or more. Otherwise, under gradient
checkpointing (transformers builds no cache for checkpointed layers) and across trainer ranks
(``optimize.shares_prefixes``), the caller runs its plain forward.
"""
from __future__ import annotations

import torch

from rlstream.sampling.prefix_cache import prefill_distinct


def shared_prefix_logits(model: torch.nn.Module, tokens_B_N: torch.Tensor, attention_B_N: torch.Tensor,
                         first: int) -> torch.Tensor | None:
    """Logits (B, N - 1 - first, V) of positions ``first .. N - 2`` (what ``token_logprobs``
    reads), the rows' common prefix ``0 .. first`` computed once per distinct prefix; None when
    that would not save work or ``model`` cannot take a cache (the caller's plain forward then).

    A row shorter than the prefix (one with no trained target) has padding in its prefix; the
    masks keep it out of every real row's attention, as in the plain forward."""
    B, N = tokens_B_N.shape
    S = first + 1  # the prefix: tokens 0 .. first; the logits of its last position are the first read
    if S < 2 or S > N - 1:
        return None
    prefilled = prefill_distinct(model, tokens_B_N[:, :S], attention_B_N[:, :S], last_logits_only=True)
    if prefilled is None:
        return None
    logits_B_1_V = prefilled.logits_U_L_V[:, -1:][prefilled.row_prefix_B]
    if S == N - 1:  # nothing after the prefix is read (one-token completions)
        return logits_B_1_V.float()
    rest = model(input_ids=tokens_B_N[:, S:N - 1], attention_mask=attention_B_N[:, :N - 1], use_cache=True,
                 **{prefilled.cache_arg: prefilled.cache_for_rows()})
    return torch.cat([logits_B_1_V, rest.logits], 1).float()
