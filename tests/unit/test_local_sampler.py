"""The local sampler's contract (what ``setup.sampler`` promises a rollout_fn), on the tiny
model loaded the way a worker loads it: batching of concurrent calls, ``n`` splitting,
Completion fields, per-row token budgets, and that every caller gets an answer."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from rlstream.builtin.tiny_model import save_tiny_model
from rlstream.core import weights
from rlstream.core.messages import WeightsPublished
from rlstream.sampling.local import LocalPolicy, LocalSampler, truncate_to_budget

KW = dict(max_tokens=6, temperature=1.0, top_p=1.0, top_k=0, max_seq_len=64, logprobs=True)


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> WeightsPublished:
    root = tmp_path_factory.mktemp("weights")
    model_dir = save_tiny_model(root / "model")
    digest, size = weights.seal(model_dir, root / "v0", version=0)
    return WeightsPublished(version=0, uri=str(root / "v0"), sha256=digest, bytes=size)


@pytest.fixture
def policy(published) -> LocalPolicy:
    torch.manual_seed(0)
    return LocalPolicy(published, torch.device("cpu"), Path(published.uri).parent)


def counting(policy: LocalPolicy) -> list[int]:
    """Wrap ``policy.generate``; the returned list gets each call's batch size."""
    calls, generate = [], policy.generate

    def wrapped(prompts, **kwargs):
        calls.append(len(prompts))
        return generate(prompts, **kwargs)

    policy.generate = wrapped
    return calls


def ids(policy: LocalPolicy, text: str) -> list[int]:
    return policy.tokenizer(text, add_special_tokens=False)["input_ids"]


def gather(*coros, timeout: float = 20.0):
    """All results (exceptions included); a caller left hanging fails the test, not the suite."""
    async def run():
        return await asyncio.wait_for(asyncio.gather(*coros, return_exceptions=True), timeout)
    return asyncio.run(run())


def test_concurrent_calls_share_one_generate_and_n_splits(policy):
    calls = counting(policy)
    sampler = LocalSampler(policy, dict(KW))
    prompts = [ids(policy, "1+2="), ids(policy, "33+4="), ids(policy, "5+66=")]
    results = gather(*(sampler.sample_with_prompt_tokens(p, n=n) for p, n in zip(prompts, (1, 3, 2))))
    assert calls == [6]  # one batched generate for all six completions
    assert [len(r) for r in results] == [1, 3, 2]
    for prompt, completions in zip(prompts, results):
        for c in completions:
            assert c.prompt_len == len(prompt) and c.full_tokens[:c.prompt_len] == prompt
            assert len(c.inference_logprobs) == len(c.output_tokens) >= 1
            assert all(lp <= 0.0 for lp in c.inference_logprobs)
            assert c.finish_reason in ("stop", "length") and c.version == 0
            assert c.text == policy.tokenizer.decode(c.output_tokens, skip_special_tokens=True)
            if c.finish_reason == "stop":
                assert c.output_tokens[-1] in policy.eos_ids
            else:
                assert len(c.output_tokens) == KW["max_tokens"] and not set(c.output_tokens) & policy.eos_ids


def test_sample_with_tokens_applies_the_chat_template(policy):
    sampler = LocalSampler(policy, dict(KW))
    [[c]] = gather(sampler.sample_with_tokens([{"role": "user", "content": "3+4"}]))
    assert c.full_tokens[:c.prompt_len] == ids(policy, "3+4=")  # the tiny template ends a user turn with "="


def test_vocab_size_is_the_embedding_size(policy):
    assert policy.vocab_size == policy.model.get_input_embeddings().num_embeddings == len(policy.tokenizer)


def test_each_row_gets_its_own_token_budget(policy):
    policy.eos_ids = {-1}  # never sampled: every row runs to its own budget
    sampler = LocalSampler(policy, dict(KW, max_tokens=8, max_seq_len=20))
    short, long = ids(policy, "1+2="), ids(policy, "1" * 17 + "=")  # 4 and 18 tokens
    [[a], [b]] = gather(sampler.sample_with_prompt_tokens(short), sampler.sample_with_prompt_tokens(long))
    assert len(a.output_tokens) == 8 and a.finish_reason == "length"  # not cut to the long prompt's room
    assert len(b.output_tokens) == 2 and len(b.full_tokens) == 20
    assert len(a.inference_logprobs) == 8 and len(b.inference_logprobs) == 2


def test_cut_keeps_tokens_up_to_eos_or_budget():
    assert truncate_to_budget([5, 6, 2, 7], budget=4, eos_ids={2}) == (3, "stop")
    assert truncate_to_budget([5, 6, 2, 7], budget=2, eos_ids={2}) == (2, "length")  # eos after the row's budget
    assert truncate_to_budget([5, 2], budget=4, eos_ids={2}) == (2, "stop")


def test_a_prompt_without_room_fails_only_its_caller(policy):
    sampler = LocalSampler(policy, dict(KW, max_seq_len=10))
    ok, too_long = gather(sampler.sample_with_prompt_tokens(ids(policy, "1+2=")),
                          sampler.sample_with_prompt_tokens(ids(policy, "123456789+1=")))
    assert len(ok) == 1 and ok[0].prompt_len == 4
    assert isinstance(too_long, ValueError) and "max_seq_len 10" in str(too_long)
    with pytest.raises(ValueError, match="max_seq_len 10"):  # direct callers of generate too
        policy.generate([ids(policy, "123456789+1=")], max_tokens=6, temperature=1.0, max_seq_len=10)


def test_unknown_kwargs_name_the_supported_ones(policy):
    sampler = LocalSampler(policy, dict(KW))
    bad, good = gather(sampler.sample_with_prompt_tokens(ids(policy, "1+2="), stop=["\n"], seed=3),
                       sampler.sample_with_prompt_tokens(ids(policy, "1+2=")))
    assert isinstance(bad, TypeError) and "seed, stop" in str(bad) and "max_tokens" in str(bad)
    assert len(good) == 1


def test_a_failing_batch_answers_every_caller(policy):
    sampler = LocalSampler(policy, dict(KW))
    # An unhashable value of a supported kwarg: the batch key and generate must not strand anyone.
    bad, good = gather(sampler.sample_with_prompt_tokens(ids(policy, "1+2="), temperature=[1.0]),
                       sampler.sample_with_prompt_tokens(ids(policy, "1+2=")))
    assert isinstance(bad, Exception) and not isinstance(bad, asyncio.TimeoutError)
    assert len(good) == 1


def test_a_cancelled_caller_does_not_strand_the_others(policy):
    sampler = LocalSampler(policy, dict(KW))

    async def run():
        a = asyncio.ensure_future(sampler.sample_with_prompt_tokens(ids(policy, "1+2=")))
        b = asyncio.ensure_future(sampler.sample_with_prompt_tokens(ids(policy, "3+4=")))
        await asyncio.sleep(0)  # both queued, flush scheduled
        a.cancel()
        return await asyncio.wait_for(b, 20)

    assert len(asyncio.run(run())) == 1


def test_max_batch_rows_splits_the_draws_of_several_groups(policy):
    """A worker with several groups in flight: their draws arrive in one tick and go out in
    generate calls of at most max_batch_rows rows; a call's n completions are never split."""
    calls = counting(policy)
    sampler = LocalSampler(policy, dict(KW), max_batch_rows=8)
    prompt = ids(policy, "1+2=")
    results = gather(*(sampler.sample_with_prompt_tokens(prompt, n=2) for _ in range(7)),
                     sampler.sample_with_prompt_tokens(prompt, n=9))
    assert all(not isinstance(r, BaseException) for r in results), results
    assert [len(r) for r in results] == [2] * 7 + [9]
    assert calls == [8, 6, 9]


@pytest.mark.numeric
def test_shared_prefix_prefills_each_prompt_once_and_draws_what_generate_draws(published):
    """``workers.shared_prefix``: prompts of different lengths (left-padded), 4 draws each, one
    prefill of the 3 distinct prompts before ``generate``; the same seed draws the same tokens,
    with the same logprobs to float rounding, as the plain ``generate``."""
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    rows = [p for p in prompts for _ in range(4)]
    plain = LocalPolicy(published, torch.device("cpu"), Path(published.uri).parent)
    shared = LocalPolicy(published, torch.device("cpu"), Path(published.uri).parent, shared_prefix=True)
    forwards: list[tuple[int, int]] = []
    shared.model.register_forward_pre_hook(
        lambda m, args, kwargs: forwards.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    kw = {k: v for k, v in KW.items() if k != "logprobs"}
    torch.manual_seed(3)
    expected = plain.generate(rows, **kw)
    torch.manual_seed(3)
    got = shared.generate(rows, **kw)
    assert forwards[0] == (3, 4)  # the distinct prompts, left-padded to 5, all but their last token
    assert forwards[1][0] == len(rows) and forwards[1][1] == 1  # generate's first step: every row's last token
    for e, g in zip(expected, got):
        assert g.full_tokens == e.full_tokens and g.finish_reason == e.finish_reason
        assert g.inference_logprobs == pytest.approx(e.inference_logprobs, abs=1e-5)


def test_shared_prefix_generates_plainly_where_prompts_do_not_repeat(published):
    shared = LocalPolicy(published, torch.device("cpu"), Path(published.uri).parent, shared_prefix=True)
    forwards: list[int] = []
    shared.model.register_forward_pre_hook(
        lambda m, args, kwargs: forwards.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    shared.generate([[5, 6, 7], [8, 9, 10], [11, 12, 13]], **{k: v for k, v in KW.items() if k != "logprobs"})
    assert forwards[0] == 3 and all(n == 3 for n in forwards)  # no prefill: generate's own steps only


def test_shared_prefix_generates_plainly_for_a_model_whose_generation_config_picks_its_cache(published):
    """A model shipped with ``cache_implementation`` in its generation config (a static cache, for
    ``torch.compile``): ``generate`` refuses a cache built outside it beside that setting, so the
    plain ``generate`` runs instead of every draw failing."""
    shared = LocalPolicy(published, torch.device("cpu"), Path(published.uri).parent, shared_prefix=True)
    shared.model.generation_config.cache_implementation = "static"
    forwards: list[tuple[int, int]] = []
    shared.model.register_forward_pre_hook(
        lambda m, args, kwargs: forwards.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    rows = [[5, 6, 7, 8]] * 4 + [[9, 10, 11, 12]] * 4
    completions = shared.generate(rows, **{k: v for k, v in KW.items() if k != "logprobs"})
    assert len(completions) == len(rows)
    assert forwards[0] == (len(rows), 4)  # no prefill: generate's own, of every row's whole prompt
