"""Single-turn, token-in rollout (the Fireworks cookbook's shape; only the import differs).

Rows are pre-tokenized: ``{"prompt_token_ids": [...], "answer": "7"}``. One
``sample_with_prompt_tokens`` call per rollout; the mask trains only the completion.
"""
import asyncio

from rlstream import RolloutSample, RolloutSetup


def make_rollout_fn(setup: RolloutSetup):
    sampler, tokenizer = setup.sampler, setup.tokenizer

    async def rollout_fn(sample_prompt: dict) -> RolloutSample | None:
        prompt = sample_prompt["prompt_token_ids"]
        completions = await sampler.sample_with_prompt_tokens(prompt, n=1, **setup.sample_kwargs)
        c = completions[0]
        output = c.output_tokens
        answer = tokenizer.decode(output, skip_special_tokens=True).strip()
        return RolloutSample(
            tokens=c.full_tokens,
            logprobs=[0.0] * c.prompt_len + list(c.inference_logprobs),
            loss_mask=[0] * c.prompt_len + [1] * len(output),
            reward=1.0 if answer == sample_prompt["answer"] else 0.0,
            finish_reason=c.finish_reason,
            text=c.text,
        )

    return rollout_fn


def drop_zero_variance(group) -> bool:
    """dynamic_filter_fn: a group whose rewards are all equal has zero advantage everywhere."""
    return len(set(group.rewards)) > 1


async def evaluate(ctx) -> dict:
    """evaluation_fn: accuracy on 20 fixed problems with the current weights. ``ctx.rollout_fn``
    is this file's rollout_fn over the trainer's sampler (so it scores exactly as training does);
    the 20 concurrent calls are sampled as one batch."""
    problems = [(a, b) for a in range(0, 10, 2) for b in range(0, 10, 3)][:20]
    rows = [{"prompt_token_ids": ctx.tokenizer(f"{a}+{b}=", add_special_tokens=False)["input_ids"],
             "answer": str((a + b) % 10)} for a, b in problems]
    samples = await asyncio.gather(*(ctx.rollout_fn(row, row_index=i) for i, row in enumerate(rows)))
    return {"accuracy": sum(s.reward for s in samples if s is not None) / len(rows)}
