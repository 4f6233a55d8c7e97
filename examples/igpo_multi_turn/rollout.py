"""A lookup in two turns on the built-in model, for IGPO: the call turn reveals the answer.

The row names a register, ``{"messages": [{"role": "user", "content": "37"}]}``. Each episode the
environment puts a fresh random digit there (the ground truth, unseen by the policy: the policy
cannot memorise it) and the task is to answer that digit. In its first turn the policy may answer
at once (a digit) or look the register up by answering ``+``; the lookup's result comes back as a
``tool`` message and the policy answers in a second turn. Reward: 1.0 for the right digit after a
lookup; an answer without one is a guess and is never accepted (as an answer without its source
is not), so that luck does not reward guessing.

Why information gain fits: the lookup turn is what makes the answer knowable. IGPO's reward for
it is p_1 - p_0, the rise of the policy's own probability of the true digit once the result is in
its context (p_0: after the prompt alone); it credits a lookup as soon as the policy starts to
copy results, even in an episode whose final answer was wrong, where the outcome alone gives the
lookup nothing to go on. The sample carries the digit as ``answer_tokens`` (what the trainer
scores after each turn's prefix; a prefix here ends with the chat template's ``=``, the cue to
answer, so the digit is scored as the reply) and flattens its turns as every multi-turn rollout
does: mask 1 on sampled tokens (the turns), 0 on the prompt, the template's tokens and the
lookup's result.
"""
from __future__ import annotations

import random
from typing import Any

from rlstream import RolloutSample, RolloutSetup, chat_prompt_ids

LOOKUP = "+"  # a turn that is exactly this looks the register up (the built-in vocabulary has no names)


def appended_ids(tokenizer, conversation: list[dict[str, Any]], tokens: list[int]) -> list[int]:
    """What the chat template renders after ``tokens`` (ending with a sampled turn) for
    ``conversation`` (ending with the tool's message) and the next generation prompt; the sampled
    ids are kept as sampled, never decoded and encoded again."""
    full = chat_prompt_ids(tokenizer, conversation, add_generation_prompt=True)
    if full[:len(tokens)] != tokens:
        raise ValueError("the chat template does not continue the sampled tokens (it rewrites earlier turns)")
    return full[len(tokens):]


def make_rollout_fn(setup: RolloutSetup):
    sampler, tokenizer = setup.sampler, setup.tokenizer
    rng = random.Random(int(setup.extras.get("seed", 0)))
    max_turns = int(setup.extras.get("max_turns", 2))

    async def rollout_fn(row: dict) -> RolloutSample:
        messages = list(row["messages"])
        truth = str(rng.randrange(10))  # this episode's content of the register
        tokens = chat_prompt_ids(tokenizer, messages, add_generation_prompt=True)
        logprobs, mask = [0.0] * len(tokens), [0] * len(tokens)
        lookups, text = 0, ""
        for turn in range(max_turns):
            [c] = await sampler.sample_with_prompt_tokens(tokens, n=1, **setup.sample_kwargs)
            tokens += c.output_tokens
            logprobs += list(c.inference_logprobs)
            mask += [1] * len(c.output_tokens)
            text = c.text.replace(tokenizer.eos_token, "").strip()
            if text != LOOKUP or turn == max_turns - 1:
                break  # an answer (or a lookup with no turn left to use it)
            lookups += 1
            messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": truth}]
            observed = appended_ids(tokenizer, messages, tokens)
            tokens += observed
            logprobs += [0.0] * len(observed)
            mask += [0] * len(observed)
        reward = 1.0 if lookups and text == truth else 0.0  # a guess is never accepted
        return RolloutSample(tokens=tokens, logprobs=logprobs, loss_mask=mask, reward=reward,
                             finish_reason=c.finish_reason, text=text,
                             answer_tokens=tokenizer.encode(truth, add_special_tokens=False),
                             metrics={"lookups": float(lookups), "accuracy": reward})

    return rollout_fn
