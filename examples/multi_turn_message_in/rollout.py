"""Multi-turn, message-in rollout: up to ``extras.max_turns`` assistant turns (default 2).

After a wrong answer a fixed retry message is appended as a user turn and the policy
answers again. All turns flatten into one sample: mask 1 on every assistant (sampled) token,
0 on prompt, template and user tokens, so the mask has interior zeros.

How the retry turn is appended (``continuation_ids``). The sample's tokens must be exactly
what the policy saw and produced: the prompt as the chat template renders it, each assistant
turn as the sampled ids (never decoded and re-encoded: that can change the ids, and the
trained tokens would not be the sampled ones), and between turns whatever the template puts
there. Rendering the retry message on its own is wrong on real chat templates (Qwen2.5 inserts
its default system prompt into every rendering, Llama-3 a BOS; the separator after the
end-of-turn token, Qwen's ``"\\n"`` after ``<|im_end|>``, is missing). Instead, as token ids:

1. ``base = template(conversation, add_generation_prompt=False)``, the conversation ending with
   the turn just sampled (as text: only the tokens around it are used, never its own ids), and
   ``full = template(conversation + [retry message], add_generation_prompt=True)``.
2. The template must be *prefix-stable*: ``full[:len(base)] == base`` (adding a message does
   not change how the earlier ones render); else ``ValueError``. ``delta = full[len(base):]``
   is the retry turn plus the next generation prompt.
3. ``closing`` = ``base`` after its last end-of-turn id: what the template puts after the token
   that ends an assistant turn (``"\\n"`` for ChatML, nothing for Llama-3). The end-of-turn id
   is the tokenizer's eos (``extras.end_of_turn_token`` names another, e.g. ``"<end_of_turn>"``
   for templates whose turns do not end with eos); it must close the assistant turn in ``base``.
4. Appended: ``closing + delta`` when the sampled turn ended with that id (the sampled id stays,
   mask 1). A turn that did not (finish_reason ``"length"``: cut at ``max_tokens``; or stopped on
   another stop id) gets ``[end-of-turn] + closing + delta``: the next turn sees a closed turn as
   the template renders it, and, mask 0, the policy is not trained on an id it never sampled.

No turn is started that could not fit: when ``len(tokens) + len(appended) + 1 >
sample_kwargs["max_seq_len"]`` the rollout ends there (the sampler would raise otherwise).
"""
from __future__ import annotations

from typing import Any

from reward import verify

from rlstream import RolloutSample, RolloutSetup, chat_prompt_ids

RETRY = "Wrong. Try again"


def continuation_ids(tokenizer, conversation: list[dict[str, Any]], output: list[int],
                     user_message: dict[str, Any], end_id: int) -> list[int]:
    """The ids to append after the sampled ``output`` (the last, assistant, message of
    ``conversation``) so the sequence continues with ``user_message`` and the next generation
    prompt exactly as the chat template renders it (steps 1-4 of the module docstring)."""
    base = chat_prompt_ids(tokenizer, conversation, add_generation_prompt=False)
    full = chat_prompt_ids(tokenizer, conversation + [user_message], add_generation_prompt=True)
    if full[:len(base)] != base:
        raise ValueError("the chat template is not prefix-stable: rendering the conversation with one more message "
                         "changes the tokens of the earlier ones, so the retry turn cannot be appended to the sampled "
                         "tokens; use a template that renders earlier turns the same way whatever follows")
    prompt = chat_prompt_ids(tokenizer, conversation[:-1], add_generation_prompt=True)
    if base.count(end_id) <= prompt.count(end_id):
        name = tokenizer.convert_ids_to_tokens(end_id)
        raise ValueError(f"the chat template does not end the assistant turn with {name!r} (id {end_id}); "
                         "set extras.end_of_turn_token to the token that does")
    closing = base[len(base) - base[::-1].index(end_id):]
    head = [] if output and output[-1] == end_id else [end_id]
    return head + closing + full[len(base):]


def make_rollout_fn(setup: RolloutSetup):
    sampler, tokenizer = setup.sampler, setup.tokenizer
    max_turns = int(setup.extras.get("max_turns", 2))
    max_seq_len = setup.sample_kwargs.get("max_seq_len")
    end_token = setup.extras.get("end_of_turn_token")
    end_id = tokenizer.convert_tokens_to_ids(end_token) if end_token else tokenizer.eos_token_id
    if end_id is None or (end_token and end_id == tokenizer.unk_token_id):
        raise ValueError(f"end-of-turn token {end_token or 'eos'!r} is not in the tokenizer's vocabulary")
    retry = {"role": "user", "content": RETRY}

    async def rollout_fn(sample_prompt: dict) -> RolloutSample | None:
        messages = [m for m in sample_prompt["messages"] if m["role"] != "assistant"]
        tokens = chat_prompt_ids(tokenizer, messages, add_generation_prompt=True)
        logprobs, mask = [0.0] * len(tokens), [0] * len(tokens)
        reward, finish, text = 0.0, "stop", ""
        for turn in range(max_turns):
            [c] = await sampler.sample_with_prompt_tokens(tokens, n=1, **setup.sample_kwargs)
            output = c.output_tokens
            tokens += output
            logprobs += list(c.inference_logprobs)
            mask += [1] * len(output)
            reward, finish, text = verify(c.text, sample_prompt["answer"]), c.finish_reason, c.text
            if reward == 1.0 or turn == max_turns - 1:
                break
            content = output[:-1] if output and output[-1] == end_id else output
            messages = messages + [{"role": "assistant",
                                    "content": tokenizer.decode(content, skip_special_tokens=True)}]
            appended = continuation_ids(tokenizer, messages, output, retry, end_id)
            if max_seq_len is not None and len(tokens) + len(appended) + 1 > max_seq_len:
                break  # no room for even one more sampled token
            messages.append(retry)
            tokens += appended
            logprobs += [0.0] * len(appended)
            mask += [0] * len(appended)
        return RolloutSample(tokens=tokens, logprobs=logprobs, loss_mask=mask, reward=reward,
                             finish_reason=finish, text=text)

    return rollout_fn
