"""The cookbook's async_rl_loop ``rollout.py``, as its page shows it, with only the import
lines changed (``# was:`` says from what). ``score`` is the part the page leaves to you ("your
reward function"): here, the built-in task's reward.
"""
from rlstream import build_deployment_sampler  # was: from training.examples.rl.vanilla_sampler import ...
from rlstream import RolloutSample  # was: from training.utils.rl.rollout import RolloutSample
from rlstream.builtin.task import VOCAB


def score(c) -> float:
    """Your reward function: 1.0 when the completion is (a + b) mod 10 for the prompt "a+b="
    (rows are pre-tokenized in the built-in model's vocabulary, where token id i is VOCAB[i])."""
    a, _, b, _ = (VOCAB[t] for t in c.full_tokens[:c.prompt_len])
    return 1.0 if c.text.strip() == str((int(a) + int(b)) % 10) else 0.0


# ---- from here on, the page's code, unchanged ----
def make_rollout_fn(setup):
    sampler = build_deployment_sampler(setup)
    sample_kwargs = dict(setup.sample_kwargs)

    async def rollout_fn(sample_prompt: dict) -> RolloutSample | None:
        completions = await sampler.sample_with_prompt_tokens(
            sample_prompt["prompt_token_ids"], n=1, **sample_kwargs,
        )
        if not completions:
            return None
        c = completions[0]
        output = list(c.full_tokens)[c.prompt_len:]
        return RolloutSample(
            tokens=list(c.full_tokens),
            logprobs=[0.0] * c.prompt_len + list(c.inference_logprobs),
            loss_mask=[0] * c.prompt_len + [1] * len(output),
            reward=score(c),                       # your reward function
            finish_reason=c.finish_reason,
            text=c.text,
        )

    return rollout_fn
