"""The closed sets of names a config field chooses from (policy losses, advantages, built-in
rewards, KL estimators, normalisations, TIS levels, learning-rate schedules, trainer dtypes), each written
once: the config validates against it, and the code that implements each name (the
trainer's losses and advantages, the built-in rewards, preflight) imports it from here.

A set whose field admits nothing else is a ``Literal`` type (pydantic validates and reports
it, type checkers see it), with its names as a tuple beside it for code that checks at run
time; ``advantage`` and ``reward_fn`` also take a ``'module:function'``, so theirs is a plain
tuple."""
from __future__ import annotations

from typing import Literal, get_args

PolicyLoss = Literal["grpo", "importance_sampling", "reinforce", "dapo", "dro", "gspo", "cispo"]
POLICY_LOSSES: tuple[str, ...] = get_args(PolicyLoss)

KlEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KlEstimator)

Normalization = Literal["token_mean", "sequence_mean", "token_sum"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)

TisLevel = Literal["token", "sequence"]
TIS_LEVELS: tuple[str, ...] = get_args(TisLevel)

LrSchedule = Literal["constant", "linear", "cosine"]  # only the config needs it as names
TrainerDtype = Literal["float32", "bfloat16", "float16"]  # likewise

# grpo: (r - mean) / std; dr_grpo: r - mean. Anything else is a 'module:function'.
ADVANTAGE_METHODS: tuple[str, ...] = ("grpo", "dr_grpo")
# rlstream.builtin.rewards implements each. Anything else is a 'module:function'.
BUILTIN_REWARDS: tuple[str, ...] = ("exact_match", "math_answer")
