"""examples/multi_turn_message_in: the retry turn is appended as the chat template renders it
(no extra system prompt or BOS, the separator after the end-of-turn token kept), the sampled
ids are kept exactly, and tokens / logprobs / loss_mask stay aligned. Tokenizers are built in
code: the built-in tiny one, a Qwen2.5-style ChatML one and a Llama-3-style one."""
from __future__ import annotations

import asyncio
import importlib.util
import string
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlstream.builtin.tiny_model import build_tokenizer
from rlstream.core.rollout import Completion, RolloutSetup, chat_prompt_ids, to_record

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "multi_turn_message_in"


def load_example():
    sys.path.insert(0, str(EXAMPLE))  # its `from reward import verify`
    try:
        spec = importlib.util.spec_from_file_location("multi_turn_message_in_rollout", EXAMPLE / "rollout.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXAMPLE))


ex = load_example()

QWEN_TEMPLATE = (  # Qwen2.5's, without tools: a default system prompt when there is none
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' or not loop.first -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
LLAMA_TEMPLATE = (  # Llama-3's shape: BOS first, turns end with <|eot_id|>, nothing after it
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
UNSTABLE_TEMPLATE = (  # a header that depends on the number of messages: not prefix-stable
    "{{- messages | length -}}|"
    "{%- for m in messages -%}{{- m['content'] + '<|im_end|>' -}}{%- endfor -%}"
)
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


def char_tokenizer(template: str, eos: str, bos: str | None = None):
    """One token per character (any printable ASCII), special tokens matched whole."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(set(string.printable)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    kwargs = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token=eos, chat_template=template,
                                   additional_special_tokens=[t for t in SPECIALS[1:] if t not in (eos, bos)],
                                   **kwargs)


class ScriptedSampler:
    """Returns the scripted outputs in order (ids, finish_reason); logprobs -1, -2, ... per call."""

    def __init__(self, tokenizer, outputs: list[tuple[list[int], str]]):
        self.tokenizer, self.outputs, self.prompts = tokenizer, list(outputs), []

    async def sample_with_prompt_tokens(self, prompt, n=1, **kwargs):
        assert len(prompt) < kwargs.get("max_seq_len", 1 << 30)
        self.prompts.append(list(prompt))
        ids, finish = self.outputs.pop(0)
        lp = -float(len(self.prompts))
        return [Completion(full_tokens=list(prompt) + ids, prompt_len=len(prompt), inference_logprobs=[lp] * len(ids),
                           finish_reason=finish, text=self.tokenizer.decode(ids, skip_special_tokens=True),
                           version=0)]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run(tokenizer, outputs, *, max_turns=2, max_seq_len=10_000, extras=None, question="3+4"):
    sampler = ScriptedSampler(tokenizer, outputs)
    setup = RolloutSetup(sampler=sampler, tokenizer=tokenizer,
                         sample_kwargs={"max_tokens": 8, "max_seq_len": max_seq_len},
                         completions_per_prompt=1, extras={"max_turns": max_turns, **(extras or {})})
    row = {"messages": [{"role": "user", "content": question}], "answer": "3 + 4 = 7\n#### 7"}
    sample = asyncio.run(ex.make_rollout_fn(setup)(row))
    to_record(sample)  # valid, as the worker checks it
    return SimpleNamespace(tokens=list(sample.tokens), logprobs=list(sample.logprobs),
                           loss_mask=list(sample.loss_mask), reward=sample.reward, text=sample.text), sampler


def check_aligned(sample, sampler, outputs):
    """tokens / logprobs / loss_mask have one entry per token; mask 1 exactly on the sampled
    ids (kept as sampled), with their logprobs; each turn was sampled from the tokens before it."""
    assert len(sample.tokens) == len(sample.logprobs) == len(sample.loss_mask)
    for turn, (prompt, (ids, _)) in enumerate(zip(sampler.prompts, outputs)):
        span = slice(len(prompt), len(prompt) + len(ids))
        assert sample.tokens[:len(prompt)] == prompt and sample.tokens[span] == ids
        assert sample.loss_mask[span] == [1] * len(ids) and sample.logprobs[span] == [-(turn + 1.0)] * len(ids)
        if turn:  # everything between the previous turn and this one is template: mask 0, logprob 0
            gap = slice(len(sampler.prompts[turn - 1]) + len(outputs[turn - 1][0]), len(prompt))
            assert set(sample.loss_mask[gap]) == {0} and set(sample.logprobs[gap]) == {0.0}
    assert sum(sample.loss_mask) == sum(len(ids) for ids, _ in outputs[:len(sampler.prompts)])


def test_tiny_tokenizer_retry_turn():
    tok = build_tokenizer()
    outputs = [(encode(tok, "5") + [tok.eos_token_id], "stop"), (encode(tok, "7") + [tok.eos_token_id], "stop")]
    sample, sampler = run(tok, list(outputs))
    # the tiny template: user turns end with "=", assistant turns with <eos>, nothing after it
    expected = encode(tok, "3+4=5<eos>" + ex.RETRY + "=7<eos>")
    assert sample.tokens == expected and sample.reward == 1.0 and sample.text == "7"
    assert "".join(map(str, sample.loss_mask)) == "0000" + "11" + "0" * (len(ex.RETRY) + 1) + "11"
    check_aligned(sample, sampler, outputs)


@pytest.mark.parametrize("template, eos, bos, rendered", [
    (QWEN_TEMPLATE, "<|im_end|>", None,
     "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
     "<|im_start|>user\n3+4<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n"  # "\n" after the sampled eos
     "<|im_start|>user\nWrong. Try again<|im_end|>\n<|im_start|>assistant\n7<|im_end|>"),  # one system prompt
    (LLAMA_TEMPLATE, "<|eot_id|>", "<|begin_of_text|>",
     "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n3+4<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nWrong. Try again<|eot_id|>"  # no second BOS
     "<|start_header_id|>assistant<|end_header_id|>\n\n7<|eot_id|>"),
])
def test_chat_template_retry_turn_matches_the_template(template, eos, bos, rendered):
    tok = char_tokenizer(template, eos, bos)
    outputs = [(encode(tok, "5") + [tok.eos_token_id], "stop"), (encode(tok, "7") + [tok.eos_token_id], "stop")]
    sample, sampler = run(tok, list(outputs))
    assert sample.tokens == encode(tok, rendered) and sample.reward == 1.0
    check_aligned(sample, sampler, outputs)
    # the whole conversation as the template renders it, up to the final end-of-turn token
    conversation = [{"role": "user", "content": "3+4"}, {"role": "assistant", "content": "5"},
                    {"role": "user", "content": ex.RETRY}, {"role": "assistant", "content": "7"}]
    full = chat_prompt_ids(tok, conversation, add_generation_prompt=False)
    assert full[:len(sample.tokens)] == sample.tokens and tok.eos_token_id not in full[len(sample.tokens):]


def test_sampled_ids_are_kept_even_when_they_are_not_the_canonical_encoding():
    tok = char_tokenizer(QWEN_TEMPLATE, "<|im_end|>")
    odd = [tok.convert_tokens_to_ids("<|endoftext|>")] + encode(tok, "5") + [tok.eos_token_id]  # decodes to "5"
    outputs = [(odd, "stop"), (encode(tok, "7") + [tok.eos_token_id], "stop")]
    sample, sampler = run(tok, list(outputs))
    check_aligned(sample, sampler, outputs)


def test_truncated_turn_gets_an_untrained_eos():
    tok = char_tokenizer(QWEN_TEMPLATE, "<|im_end|>")
    outputs = [(encode(tok, "12"), "length"), (encode(tok, "7") + [tok.eos_token_id], "stop")]
    sample, sampler = run(tok, list(outputs))
    check_aligned(sample, sampler, outputs)
    cut = len(sampler.prompts[0]) + 2
    assert sample.tokens[cut:len(sampler.prompts[1])] == encode(
        tok, "<|im_end|>\n<|im_start|>user\nWrong. Try again<|im_end|>\n<|im_start|>assistant\n")
    assert sample.loss_mask[cut] == 0 and sample.logprobs[cut] == 0.0


def test_no_turn_is_started_that_cannot_fit():
    tok = char_tokenizer(QWEN_TEMPLATE, "<|im_end|>")
    outputs = [(encode(tok, "5") + [tok.eos_token_id], "stop"), (encode(tok, "7") + [tok.eos_token_id], "stop")]
    _, sampler = run(tok, list(outputs))
    second_prompt = len(sampler.prompts[1])
    sample, sampler = run(tok, list(outputs), max_seq_len=second_prompt + 1)  # room for one token: second turn
    assert len(sampler.prompts) == 2 and sample.reward == 1.0
    sample, sampler = run(tok, list(outputs), max_seq_len=second_prompt)  # no room: stop after the first
    assert len(sampler.prompts) == 1 and sample.reward == 0.0 and sample.text == "5"
    assert sample.tokens == sampler.prompts[0] + outputs[0][0] and sum(sample.loss_mask) == 2


def test_template_that_is_not_prefix_stable_is_a_clear_error():
    tok = char_tokenizer(UNSTABLE_TEMPLATE, "<|im_end|>")
    with pytest.raises(ValueError, match="not prefix-stable"):
        run(tok, [(encode(tok, "5") + [tok.eos_token_id], "stop")] * 2)


def test_end_of_turn_token_other_than_eos():
    # Qwen base-model style: eos is <|endoftext|>, the template ends turns with <|im_end|>
    tok = char_tokenizer(QWEN_TEMPLATE, "<|endoftext|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    outputs = [(encode(tok, "5") + [im_end], "stop"), (encode(tok, "7") + [im_end], "stop")]
    with pytest.raises(ValueError, match="end_of_turn_token"):
        run(tok, list(outputs))
    sample, sampler = run(tok, list(outputs), extras={"end_of_turn_token": "<|im_end|>"})
    check_aligned(sample, sampler, outputs)
    assert sample.tokens[len(sampler.prompts[0]) + 2:][:2] == encode(tok, "\n<|im_start|>")
    with pytest.raises(ValueError, match="not in the tokenizer"):
        run(tok, list(outputs), extras={"end_of_turn_token": "<end_of_turn>"})
