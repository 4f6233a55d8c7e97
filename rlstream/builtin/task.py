"""The built-in task: prompts ``a+b=`` with digits a, b; the policy answers one token;
reward 1.0 when that token is ``(a+b) mod 10``.

Tiny vocabulary and a one-token answer on purpose (docs/design.md §14 Measured facts and
pitfalls): a 124k-parameter model learns this with plain GRPO in a few hundred steps on 2 cores,
while a 128-token vocabulary or multi-token sums stall near 0.35.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

# Character-level vocabulary; ids are positions. Shared by the tokenizer built in code.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
VOCAB = SPECIAL_TOKENS + [str(d) for d in range(10)] + ["+", "=", " "]


def builtin_rows(max_rows: int, seed: int) -> Iterator[dict[str, Any]]:
    """``max_rows`` seeded random problems (the 100 distinct ones repeat, shuffled)."""
    rng = random.Random(seed)
    for _ in range(max_rows):
        a, b = rng.randrange(10), rng.randrange(10)
        yield {"prompt": f"{a}+{b}=", "answer": str((a + b) % 10)}


def exact_match_reward(completion_text: str, answer: str) -> float:
    """1.0 when the completion, stripped of whitespace and special tokens, equals the answer."""
    text = completion_text
    for special in SPECIAL_TOKENS:
        text = text.replace(special, "")
    return 1.0 if text.strip() == str(answer).strip() else 0.0
