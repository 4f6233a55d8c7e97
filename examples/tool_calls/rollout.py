"""Multi-turn rollout with a tool call, on the built-in model's vocabulary.

The row names a register, ``{"messages": [{"role": "user", "content": "37"}]}``, and the task is
to report the digit the toy tool ``read`` finds in it. The environment puts a fresh random digit
there each episode, which the policy never sees (as a search or a sandbox returns what the model
cannot know), and an answer given without reading the register is wrong. In its first turn the
policy may answer (a digit) or call the tool by answering ``+``; the rollout then runs the tool
and appends its result as a ``tool`` message, and the policy answers in a second turn. The
reward is 1.0 when the final answer is the digit read. So the policy learns two things: to call
the tool, and to copy its result.

All turns flatten into one sample, as the cookbook's multi-turn rollouts do: mask 1 on the tokens
the policy sampled (its turns), 0 on the prompt, the template's tokens between turns and the
tool's output. What is appended after a turn is the chat template's rendering of the conversation
with the tool message, past the tokens already there; the sampled ids are never decoded and
encoded again (that could change them, and the trained tokens would not be the sampled ones). A
template that renders earlier turns differently once a message is added cannot be continued this
way: the rollout raises ``ValueError`` (examples/multi_turn_message_in/rollout.py does the same
for real chat templates, with their end-of-turn tokens).
"""
from __future__ import annotations

import asyncio
import random
from typing import Any

from rlstream import RolloutSample, RolloutSetup, chat_prompt_ids

CALL = "+"  # a turn that is exactly this calls the tool (the built-in vocabulary has no names)


class Registers:
    """The environment of one episode: each register holds a random digit, known once read."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.read_values: dict[str, str] = {}

    async def read(self, register: str) -> str:
        """The tool. Async, as a real tool that waits on I/O would be: the worker's other
        rollouts run meanwhile."""
        await asyncio.sleep(0)
        return self.read_values.setdefault(register, str(self.rng.randrange(10)))


def continuation(tokenizer, conversation: list[dict[str, Any]], tokens: list[int]) -> list[int]:
    """The ids the chat template puts after ``tokens`` (the sequence so far, ending with a
    sampled turn) to render ``conversation`` (which ends with the tool's message) and the next
    generation prompt."""
    full = chat_prompt_ids(tokenizer, conversation, add_generation_prompt=True)
    if full[:len(tokens)] != tokens:
        raise ValueError("the chat template does not render the conversation as a continuation of the sampled "
                         "tokens; see examples/multi_turn_message_in/rollout.py for templates with end-of-turn "
                         "tokens")
    return full[len(tokens):]


def make_rollout_fn(setup: RolloutSetup):
    sampler, tokenizer = setup.sampler, setup.tokenizer
    max_turns = int(setup.extras.get("max_turns", 2))
    rng = random.Random(int(setup.extras.get("seed", 0)))

    async def rollout_fn(row: dict) -> RolloutSample:
        messages = list(row["messages"])
        register, env = messages[-1]["content"], Registers(rng)
        tokens = chat_prompt_ids(tokenizer, messages, add_generation_prompt=True)
        logprobs, mask = [0.0] * len(tokens), [0] * len(tokens)
        calls, text = 0, ""
        for turn in range(max_turns):
            [c] = await sampler.sample_with_prompt_tokens(tokens, n=1, **setup.sample_kwargs)
            tokens += c.output_tokens
            logprobs += list(c.inference_logprobs)
            mask += [1] * len(c.output_tokens)
            text = c.text.replace(tokenizer.eos_token, "").strip()
            if text != CALL or turn == max_turns - 1:
                break  # an answer (or a call with no turn left to use its result)
            calls += 1
            messages += [{"role": "assistant", "content": text}, {"role": "tool", "content": await env.read(register)}]
            appended = continuation(tokenizer, messages, tokens)
            tokens += appended
            logprobs += [0.0] * len(appended)
            mask += [0] * len(appended)
        reward = 1.0 if text == env.read_values.get(register) else 0.0  # never read: never right
        return RolloutSample(tokens=tokens, logprobs=logprobs, loss_mask=mask, reward=reward,
                             finish_reason=c.finish_reason, text=text,
                             metrics={"tool_calls": float(calls), "accuracy": reward})

    return rollout_fn
