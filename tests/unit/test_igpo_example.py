"""examples/igpo_multi_turn: a lookup appends the register's digit as the chat template renders
it, the turns are the runs of 1s in the mask, the sample carries the digit as answer_tokens, and
only the right digit is rewarded; the trainer's IGPO scoring finds two turns in a lookup episode
and asks for the prompt and the prompt + lookup + result as prefixes."""
from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import torch

from rlstream.builtin.tiny_model import build_tokenizer
from rlstream.core.rollout import Completion, RolloutSetup, chat_prompt_ids
from rlstream.trainer import igpo

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "igpo_multi_turn"
spec = importlib.util.spec_from_file_location("igpo_example_rollout", EXAMPLE / "rollout.py")
ex = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ex)
TOK = build_tokenizer()


class ScriptedSampler:
    """Answers each turn with the next scripted text (one token); ``"copy"`` answers the digit just
    before the generation prompt (the lookup's result)."""

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


def rollout(turns: list[str], seed: int = 0):
    sampler = ScriptedSampler(turns)
    setup = RolloutSetup(sampler=sampler, tokenizer=TOK, sample_kwargs={"max_tokens": 1},
                         completions_per_prompt=1, extras={"seed": seed})
    return asyncio.run(ex.make_rollout_fn(setup)({"messages": [{"role": "user", "content": "37"}]})), sampler


def test_a_lookup_then_the_copied_digit_is_two_turns_with_the_answer_attached(monkeypatch):
    sample, sampler = rollout([ex.LOOKUP, "copy"])
    prompt = chat_prompt_ids(TOK, [{"role": "user", "content": "37"}], add_generation_prompt=True)
    truth = TOK.decode([sampler.prompts[1][-2]])
    expected = prompt + TOK.encode("+", add_special_tokens=False) + [TOK.eos_token_id] + \
        TOK.encode(f"{truth}=", add_special_tokens=False) + TOK.encode(truth, add_special_tokens=False)
    assert list(sample.tokens) == expected
    assert list(sample.loss_mask) == [0] * len(prompt) + [1, 0, 0, 0, 1]
    assert list(sample.answer_tokens) == TOK.encode(truth, add_special_tokens=False)
    assert sample.reward == 1.0 and sample.metrics == {"lookups": 1.0, "accuracy": 1.0}
    assert igpo.turn_spans(sample.loss_mask) == [(len(prompt), len(prompt) + 1), (len(expected) - 1, len(expected))]

    asked = []

    def fake(model, prefixes, answers, **kwargs):
        asked.extend(prefixes)
        return torch.zeros(len(prefixes), dtype=torch.float64)

    monkeypatch.setattr(igpo, "mean_answer_logprobs", fake)
    other, _ = rollout(["5"])
    igpo.igpo_advantages([sample, other], None, gamma=0.99, pad_id=0, device=torch.device("cpu"), temperature=1.0)
    assert asked == [prompt, expected[:-1]]  # p_0 on the prompt, p_1 after the lookup and its result


def test_a_guess_is_one_turn_and_never_accepted():
    for digit in "0123456789":
        sample, sampler = rollout([digit])
        assert len(sampler.prompts) == 1 and igpo.turn_spans(sample.loss_mask) == [(len(sample.tokens) - 1,
                                                                                     len(sample.tokens))]
        assert sample.reward == 0.0
