"""Multi-turn, message-in rollout: up to ``extras.max_turns`` assistant turns (default 2).

After a wrong answer a fixed retry message is appended as a user turn and the policy
answers again. All turns flatten into one sample: mask 1 on every assistant (sampled) token,
0 on prompt and user tokens, so the mask has interior zeros. Earlier assistant tokens are
kept as sampled (token ids, never re-tokenized text), so there is no re-tokenization drift;
only the new user turn is tokenized, as the delta the chat template adds for it.
"""
from rlstream import RolloutSample, RolloutSetup
from reward import verify

RETRY = "Wrong. Try again"


def turn_tokens(tokenizer, messages, add_generation_prompt):
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def make_rollout_fn(setup: RolloutSetup):
    sampler, tokenizer = setup.sampler, setup.tokenizer
    max_turns = int(setup.extras.get("max_turns", 2))
    eos = tokenizer.eos_token_id

    async def rollout_fn(sample_prompt: dict) -> RolloutSample | None:
        messages = [m for m in sample_prompt["messages"] if m["role"] != "assistant"]
        tokens = turn_tokens(tokenizer, messages, add_generation_prompt=True)
        logprobs, mask = [0.0] * len(tokens), [0] * len(tokens)
        reward, finish, text = 0.0, "stop", ""
        for turn in range(max_turns):
            [c] = await sampler.sample_with_prompt_tokens(tokens, n=1, **setup.sample_kwargs)
            output = c.full_tokens[c.prompt_len:]
            tokens += output
            logprobs += list(c.inference_logprobs)
            mask += [1] * len(output)
            reward, finish, text = verify(c.text, sample_prompt["answer"]), c.finish_reason, c.text
            if reward == 1.0 or turn == max_turns - 1:
                break
            # Close the assistant turn as the template would, then the retry user turn (mask 0).
            delta = ([eos] if not output or output[-1] != eos else [])
            delta += turn_tokens(tokenizer, [{"role": "user", "content": RETRY}], add_generation_prompt=True)
            tokens += delta
            logprobs += [0.0] * len(delta)
            mask += [0] * len(delta)
        return RolloutSample(tokens=tokens, logprobs=logprobs, loss_mask=mask, reward=reward,
                             finish_reason=finish, text=text)

    return rollout_fn
