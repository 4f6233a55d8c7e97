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


def expected_reward(weights_dir) -> float:
    """The built-in task's reward without sampling noise: the probability the model at
    ``weights_dir`` (an HF directory) gives the right answer token, averaged over the 100
    "a+b=" problems. torch/transformers are imported here: this module stays light."""
    import torch
    from transformers import AutoModelForCausalLM

    ids = {tok: i for i, tok in enumerate(VOCAB)}
    problems = [(a, b) for a in range(10) for b in range(10)]
    model = AutoModelForCausalLM.from_pretrained(weights_dir).eval()
    prompts_B_T = torch.tensor([[ids[str(a)], ids["+"], ids[str(b)], ids["="]] for a, b in problems])
    answers_B = torch.tensor([ids[str((a + b) % 10)] for a, b in problems])
    with torch.no_grad():
        probs_B_V = model(prompts_B_T).logits[:, -1].float().softmax(-1)
    return probs_B_V.gather(1, answers_B[:, None]).mean().item()
