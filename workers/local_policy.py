"""The worker's policy: a transformers model kept in process, reloaded in place when the
trainer publishes a new version, and an async sampler that batches concurrent requests.

Behaviour logprobs are taken from ``generate``'s processed scores, i.e. the exact
distribution the token was drawn from. ``top_k=0`` is passed explicitly: transformers
applies top_k=50 by default under ``do_sample=True`` (DESIGN.md s.11).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from rlstream import weights
from rlstream.messages import WeightsPublished
from rlstream.rollout import Completion, chat_prompt_ids
from rlstream.torch_setup import load_model_and_tokenizer

log = logging.getLogger(__name__)


class LocalPolicy:
    def __init__(self, published: WeightsPublished, device: torch.device):
        weights.verify(published.uri, published.sha256)
        model, tokenizer = load_model_and_tokenizer(published.uri, device)
        self._bind(model.eval(), tokenizer, device, published.version)

    @classmethod
    def from_model(cls, model, tokenizer, device: torch.device, version: int) -> LocalPolicy:
        """Sample from a live model (the trainer's, for evaluation_fn) without a copy."""
        policy = cls.__new__(cls)
        policy._bind(model, tokenizer, device, version)
        return policy

    def _bind(self, model, tokenizer, device: torch.device, version: int) -> None:
        self.model, self.tokenizer, self.device, self.version = model, tokenizer, device, version
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None} or {self.tokenizer.eos_token_id}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def load(self, published: WeightsPublished) -> None:
        """Load a newer version's tensors into the live model (no re-construction)."""
        weights.verify(published.uri, published.sha256)
        state: dict[str, torch.Tensor] = {}
        for f in sorted(Path(published.uri).glob("*.safetensors")):
            state.update(load_file(str(f), device=str(self.device)))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or {})
        if unexpected or set(missing) - tied - {"lm_head.weight"}:
            raise ValueError(f"weights {published.uri} do not fit the model: missing {missing}, unexpected {unexpected}")
        self.version = published.version

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], **kwargs: Any) -> list[Completion]:
        was_training = self.model.training
        self.model.eval()  # dropout off while sampling, whoever owns the model
        try:
            return self._generate(prompts, **kwargs)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float,
                 top_p: float = 1.0, top_k: int = 0, max_seq_len: int = 1 << 30) -> list[Completion]:
        longest = max(len(p) for p in prompts)
        new_tokens = min(max_tokens, max_seq_len - longest)
        if new_tokens < 1:
            raise ValueError(f"prompt of {longest} tokens leaves no room under max_seq_len {max_seq_len}")
        ids = torch.full((len(prompts), longest), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: generation continues at the right edge
            ids[i, longest - len(p):] = torch.tensor(p)
            attn[i, longest - len(p):] = 1
        gen_config = GenerationConfig(
            do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=new_tokens,
            pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids), output_scores=True,
            return_dict_in_generate=True, repetition_penalty=1.0,
        )
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                  generation_config=gen_config)
        gen_B_T = out.sequences[:, longest:].cpu()
        scores_B_T_V = torch.stack(out.scores, dim=1).float().cpu()
        logprobs_B_T = torch.log_softmax(scores_B_T_V, dim=-1).gather(-1, gen_B_T[..., None])[..., 0]
        results = []
        for i, prompt in enumerate(prompts):
            gen = gen_B_T[i].tolist()
            stop = next((j for j, t in enumerate(gen) if t in self.eos_ids), None)
            n = len(gen) if stop is None else stop + 1
            results.append(Completion(
                full_tokens=list(prompt) + gen[:n], prompt_len=len(prompt),
                inference_logprobs=logprobs_B_T[i, :n].tolist(),
                finish_reason="length" if stop is None else "stop",
                text=self.tokenizer.decode(gen[:n], skip_special_tokens=True),
                version=self.version,
            ))
        return results


class LocalSampler:
    """``setup.sampler``: async calls from concurrent rollout_fn invocations that arrive in
    the same event-loop tick are answered by one batched ``generate``."""

    def __init__(self, policy: LocalPolicy, default_kwargs: dict[str, Any]):
        self.policy = policy
        self.default_kwargs = default_kwargs
        self._pending: list[tuple[list[int], int, dict[str, Any], asyncio.Future]] = []

    async def sample_with_prompt_tokens(self, prompt_token_ids: list[int], n: int = 1, **kwargs: Any) -> list[Completion]:
        kw = {**self.default_kwargs, **kwargs}
        kw.pop("logprobs", None)  # always returned
        fut = asyncio.get_running_loop().create_future()
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((list(prompt_token_ids), n, kw, fut))
        return await fut

    async def sample_with_tokens(self, messages: list[dict[str, Any]], n: int = 1, **kwargs: Any) -> list[Completion]:
        return await self.sample_with_prompt_tokens(chat_prompt_ids(self.policy.tokenizer, messages), n=n, **kwargs)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        by_kwargs: dict[tuple, list] = {}
        for item in pending:
            by_kwargs.setdefault(tuple(sorted(item[2].items())), []).append(item)
        for kw_items, items in by_kwargs.items():
            prompts = [p for p, n, _, _ in items for _ in range(n)]
            try:
                completions = self.policy.generate(prompts, **dict(kw_items))
            except Exception as exc:  # hand the error to each caller's rollout_fn
                for *_, fut in items:
                    fut.set_exception(exc)
                continue
            start = 0
            for _, n, _, fut in items:
                fut.set_result(completions[start:start + n])
                start += n
