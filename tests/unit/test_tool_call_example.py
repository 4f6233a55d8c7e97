"""examples/tool_calls: a call runs the tool and appends its result as the chat template renders
it, the sampled ids stay as sampled, tokens / logprobs / loss_mask stay aligned, and only an
answer equal to the digit read is rewarded."""
from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from rlstream.builtin.tiny_model import build_tokenizer
from rlstream.core.rollout import Completion, RolloutSetup, chat_prompt_ids

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tool_calls"
spec = importlib.util.spec_from_file_location("tool_calls_rollout", EXAMPLE / "rollout.py")
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)
TOK = build_tokenizer()


class ScriptedSampler:
    """Answers each turn with the next scripted text (one token); ``"copy"`` answers the digit
    just before the generation prompt (the tool's result)."""

    def __init__(self, turns: list[str]):
        self.turns, self.prompts = list(turns), []

    async def sample_with_prompt_tokens(self, prompt: list[int], n: int = 1, **kwargs) -> list[Completion]:
        self.prompts.append(list(prompt))
        text = self.turns.pop(0)
        if text == "copy":
            text = TOK.decode([prompt[-2]])
        [token] = TOK.encode(text, add_special_tokens=False)
        return [Completion(full_tokens=list(prompt) + [token], prompt_len=len(prompt), inference_logprobs=[-0.5],
                           finish_reason="length", text=text, version=0)]


def rollout(turns: list[str], max_turns: int = 2):
    sampler = ScriptedSampler(turns)
    setup = RolloutSetup(sampler=sampler, tokenizer=TOK, sample_kwargs={"max_tokens": 1},
                         completions_per_prompt=1, extras={"max_turns": max_turns})
    sample = asyncio.run(ex.make_rollout_fn(setup)({"messages": [{"role": "user", "content": "37"}]}))
    return sample, sampler


def test_a_call_then_the_copied_result_is_rewarded_with_the_tool_output_masked():
    sample, sampler = rollout([ex.CALL, "copy"])
    prompt = chat_prompt_ids(TOK, [{"role": "user", "content": "37"}], add_generation_prompt=True)
    read = TOK.decode([sampler.prompts[1][-2]])
    # prompt "37=", the call "+" (sampled), the template's "<eos>" after it and the tool's "<d>=", the answer
    expected = prompt + TOK.encode("+", add_special_tokens=False) + [TOK.eos_token_id] + \
        TOK.encode(f"{read}=", add_special_tokens=False) + TOK.encode(read, add_special_tokens=False)
    assert list(sample.tokens) == expected and sampler.prompts[1] == expected[:-1]
    assert list(sample.loss_mask) == [0] * len(prompt) + [1, 0, 0, 0, 1]
    assert list(sample.logprobs) == [0.0] * len(prompt) + [-0.5, 0.0, 0.0, 0.0, -0.5]
    assert sample.reward == 1.0 and sample.metrics == {"tool_calls": 1.0, "accuracy": 1.0} and sample.text == read


def test_an_answer_without_reading_the_register_is_never_right():
    for digit in "0123456789":
        sample, sampler = rollout([digit])
        assert sample.reward == 0.0 and len(sampler.prompts) == 1 and sample.metrics["tool_calls"] == 0.0


def test_a_wrong_copy_is_not_rewarded_and_a_call_on_the_last_turn_is_not_run():
    sample, sampler = rollout([ex.CALL, ex.CALL])
    assert sample.reward == 0.0 and len(sampler.prompts) == 2 and sample.metrics["tool_calls"] == 1.0
    sample, sampler = rollout([ex.CALL], max_turns=1)  # no turn left to use the result: the tool is not run
    assert sample.reward == 0.0 and len(sampler.prompts) == 1 and sample.metrics["tool_calls"] == 0.0


def test_a_template_that_rewrites_earlier_turns_is_refused():
    class Rewriting:
        def apply_chat_template(self, messages, **kwargs):
            return [len(messages)] + [1] * len(messages)  # the first id depends on how many messages follow

    with pytest.raises(ValueError, match="continuation of the sampled"):
        ex.continuation(Rewriting(), [{"role": "user", "content": "x"}] * 3, [2, 1, 1])
