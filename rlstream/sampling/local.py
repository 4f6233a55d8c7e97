"""The local policy: a transformers model kept in process (a worker's, reloaded in place when
the trainer publishes a new version; or the trainer's own, for evaluation), and an async
sampler that batches concurrent requests.

Behaviour logprobs are taken from ``generate``'s processed scores, i.e. the exact
distribution the token was drawn from. ``top_k=0`` is passed explicitly: transformers
applies top_k=50 by default under ``do_sample=True`` (docs/design.md §15.16 Sampling with
top_k = 0).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import GenerationConfig

from rlstream.core import weights
from rlstream.core.messages import WeightsPublished
from rlstream.core.rollout import NO_LIMIT, Completion, chat_prompt_ids, no_room, token_budget
from rlstream.sampling.prefix_cache import prefill_distinct
from rlstream.sampling.torch_setup import load_model_and_tokenizer

log = logging.getLogger(__name__)
# What ``generate`` understands; ``logprobs`` is accepted and ignored (always returned).
SAMPLE_KWARGS = frozenset({"max_tokens", "temperature", "top_p", "top_k", "max_seq_len", "logprobs"})


def truncate_to_budget(gen: list[int], budget: int, eos_ids: set[int]) -> tuple[int, str]:
    """(tokens kept, finish_reason) of one row generated past its own budget: keeping the
    first ``budget`` tokens is distributionally the same as having stopped there."""
    stop = next((j for j, t in enumerate(gen[:budget]) if t in eos_ids), None)
    return (min(len(gen), budget), "length") if stop is None else (stop + 1, "stop")


class LocalPolicy:
    def __init__(self, published: WeightsPublished, device: torch.device, weights_root: str | Path, *,
                 shared_prefix: bool = False):
        """``weights_root``: the run's ``weights/`` directory; version N is read from
        ``<weights_root>/v<N>`` (``published.uri`` is never opened: it comes from Redis).
        ``shared_prefix`` (``workers.shared_prefix``): each distinct prompt of a ``generate``
        call prefilled once (``prefill_distinct``), its cache repeated to its rows."""
        self.weights_root, self.shared_prefix = Path(weights_root), shared_prefix
        directory = weights.version_dir(self.weights_root, published.version)
        weights.verify(directory, published.sha256)
        model, tokenizer = load_model_and_tokenizer(str(directory), device)
        self._bind(model.eval(), tokenizer, device, published.version)

    @classmethod
    def from_model(cls, model, tokenizer, device: torch.device, version: int) -> LocalPolicy:
        """Sample from a live model (the trainer's, for evaluation_fn) without a copy."""
        policy = cls.__new__(cls)
        policy.shared_prefix = False
        policy._bind(model, tokenizer, device, version)
        return policy

    def _bind(self, model, tokenizer, device: torch.device, version: int) -> None:
        self.model, self.tokenizer, self.device, self.version = model, tokenizer, device, version
        # A worker with several groups in flight loads new weights from one job's thread while
        # the sampling loop's thread may be generating: never both at once.
        self._lock = threading.Lock()
        # The ids the model can emit (and the trainer accepts): the embedding rows, which
        # may exceed len(tokenizer) when the vocabulary is padded.
        self.vocab_size = model.get_input_embeddings().num_embeddings
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None} or {self.tokenizer.eos_token_id}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def load(self, published: WeightsPublished) -> None:
        """Load a newer version's tensors into the live model (no re-construction)."""
        directory = weights.version_dir(self.weights_root, published.version)
        weights.verify(directory, published.sha256)
        state: dict[str, torch.Tensor] = {}
        for f in sorted(directory.glob("*.safetensors")):
            state.update(load_file(str(f), device=str(self.device)))
        with self._lock:
            self._load_state(state, directory)
            self.version = published.version

    def _load_state(self, state: dict[str, torch.Tensor], directory: Path) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = set(getattr(self.model, "_tied_weights_keys", None) or {})
        if unexpected or set(missing) - tied - {"lm_head.weight"}:
            raise ValueError(f"weights {directory} do not fit the model: missing {missing}, unexpected {unexpected}")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], **kwargs: Any) -> list[Completion]:
        with self._lock:
            was_training = self.model.training
            self.model.eval()  # dropout off while sampling, whoever owns the model
            try:
                return self._generate(prompts, **kwargs)
            finally:
                self.model.train(was_training)

    def _generate(self, prompts: list[list[int]], *, max_tokens: int, temperature: float,
                  top_p: float = 1.0, top_k: int = 0, max_seq_len: int = NO_LIMIT) -> list[Completion]:
        budgets = [token_budget(len(p), max_tokens, max_seq_len) for p in prompts]
        for p, b in zip(prompts, budgets):
            if b < 1:
                raise no_room(len(p), max_seq_len)
        longest = max(len(p) for p in prompts)
        # left padding: generation continues at the right edge. Built as lists and made tensors once (a
        # slice assignment per row cost ~20 us each, ~10 ms for the built-in task's 256 rows)
        ids = torch.tensor([[self.pad_id] * (longest - len(p)) + list(p) for p in prompts], dtype=torch.long)
        attn = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
        gen_config = GenerationConfig(
            do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max(budgets),
            pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids), output_scores=True,
            return_dict_in_generate=True, repetition_penalty=1.0,
        )
        ids, attn = ids.to(self.device), attn.to(self.device)
        out = self.model.generate(input_ids=ids, attention_mask=attn, generation_config=gen_config,
                                  **self.prefilled(ids, attn))
        gen_B_T = out.sequences[:, longest:].cpu()
        scores_B_T_V = torch.stack(out.scores, dim=1).float().cpu()
        logprobs_B_T = torch.log_softmax(scores_B_T_V, dim=-1).gather(-1, gen_B_T[..., None])[..., 0]
        results = []
        # every row read back at once: a tensor index and a tolist() per row cost more than the rows' values
        for prompt, budget, gen, logprobs in zip(prompts, budgets, gen_B_T.tolist(), logprobs_B_T.tolist()):
            n, reason = truncate_to_budget(gen, budget, self.eos_ids)
            results.append(Completion(
                full_tokens=list(prompt) + gen[:n], prompt_len=len(prompt),
                inference_logprobs=logprobs[:n], finish_reason=reason,
                text=self.tokenizer.decode(gen[:n], skip_special_tokens=True),
                version=self.version,
            ))
        return results

    def prefilled(self, ids_B_L: torch.Tensor, attention_B_L: torch.Tensor) -> dict[str, Any]:
        """With ``shared_prefix``, ``generate``'s cache argument: every token of each distinct
        left-padded prompt but its last, through the model once and repeated to the prompt's rows
        (``generate`` then runs the last token of every row, and goes on from there); {} when it
        would not save work or ``generate`` would refuse it (``generate_takes_a_cache``). The
        draws are those of the plain ``generate`` to float rounding of their logits
        (docs/design.md §15.100 A group's prompt is computed once)."""
        if not self.shared_prefix or ids_B_L.shape[1] < 2 or not generate_takes_a_cache(self.model):
            return {}
        with torch.no_grad():
            prefilled = prefill_distinct(self.model, ids_B_L[:, :-1], attention_B_L[:, :-1], last_logits_only=True,
                                         left_padded=True)
        return {} if prefilled is None else {prefilled.cache_arg: prefilled.cache_for_rows()}


def generate_takes_a_cache(model: torch.nn.Module) -> bool:
    """Whether ``model.generate`` takes a cache built outside it. It refuses one (a ValueError,
    which would fail every draw) beside a ``cache_implementation`` that the model's generation
    config picks, as a model shipped for ``torch.compile`` picks "static"; "hybrid", which older
    sliding-window models ship, transformers 5 drops itself before that check."""
    return getattr(getattr(model, "generation_config", None), "cache_implementation", None) in (None, "hybrid")


def preload_model_code(base_model: str) -> None:
    """Import the modeling code ``from_pretrained`` will need for ``base_model``'s architecture
    (transformers' model-loading stack and the model class: ~2 s on a 2-core machine) while the
    worker waits for the trainer's first weights, instead of after them, on the first step's
    path. Best effort: whatever fails here is left to the real load to report."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from rlstream.builtin.tiny_model import model_config
    from rlstream.core.config import BUILTIN_MODELS

    try:
        config = model_config(base_model) if base_model in BUILTIN_MODELS else AutoConfig.from_pretrained(base_model)
        MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception as exc:  # an unknown architecture, a path that is not a model: the load says so
        log.debug("preloading the modeling code of %s failed: %r", base_model, exc)


class LocalSampler:
    """``setup.sampler``: async calls from concurrent rollout_fn invocations that arrive in
    the same event-loop tick (in a worker with several groups in flight: the draws of all of
    them) are answered by batched ``generate`` calls of at most ``max_batch_rows`` rows
    (unset = one call for all)."""

    def __init__(self, policy: LocalPolicy, default_kwargs: dict[str, Any], max_batch_rows: int | None = None):
        self.policy = policy
        self.default_kwargs = default_kwargs
        self.max_batch_rows = max_batch_rows
        self._pending: list[tuple[list[int], int, dict[str, Any], asyncio.Future]] = []

    async def sample_with_prompt_tokens(self, prompt_token_ids: list[int], n: int = 1,
                                        **kwargs: Any) -> list[Completion]:
        kw = {**self.default_kwargs, **kwargs}
        unknown = sorted(set(kw) - SAMPLE_KWARGS)
        if unknown:
            raise TypeError(f"the local sampler does not support {', '.join(unknown)}; it takes "
                            f"{', '.join(sorted(SAMPLE_KWARGS))} (use inference.backend = \"openai\" for more)")
        kw.pop("logprobs", None)  # always returned
        fut = asyncio.get_running_loop().create_future()
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((list(prompt_token_ids), n, kw, fut))
        return await fut

    async def sample_with_tokens(self, messages: list[dict[str, Any]], n: int = 1, **kwargs: Any) -> list[Completion]:
        return await self.sample_with_prompt_tokens(chat_prompt_ids(self.policy.tokenizer, messages), n=n, **kwargs)

    def _flush(self) -> None:
        """Runs as a loop callback, where an escaping exception only gets logged: every
        future must be resolved here, or its rollout hangs until the job times out."""
        pending, self._pending = self._pending, []
        try:
            by_kwargs: dict[str, list] = {}
            for item in pending:  # repr: kwarg values may be unhashable (lists)
                by_kwargs.setdefault(repr(sorted(item[2].items())), []).append(item)
            for items in by_kwargs.values():
                self._serve(items)
        except Exception as exc:
            log.exception("local sampler: batch failed")
            _fail([fut for *_, fut in pending], exc)
        finally:
            _fail([fut for *_, fut in pending], RuntimeError("the local sampler stopped before answering"))

    def _serve(self, items: list[tuple[list[int], int, dict[str, Any], asyncio.Future]]) -> None:
        """One ``generate`` for the callers sharing these kwargs; a prompt without room
        under max_seq_len fails only its own caller."""
        kw = items[0][2]
        try:
            limit = kw.get("max_seq_len", NO_LIMIT)
            fits = []
            for prompt, n, _, fut in items:
                if token_budget(len(prompt), kw["max_tokens"], limit) < 1:
                    _fail([fut], no_room(len(prompt), limit))
                else:
                    fits.append((prompt, n, fut))
            for chunk in batches(fits, self.max_batch_rows):
                self._generate_for(chunk, kw)
        except Exception as exc:  # hand the error to each caller's rollout_fn
            _fail([fut for *_, fut in items], exc)

    def _generate_for(self, chunk: list[tuple[list[int], int, asyncio.Future]], kw: dict[str, Any]) -> None:
        """One ``generate`` for ``chunk``'s callers. If it fails with several callers in it, each
        is answered by a ``generate`` of its own: one poison prompt (an id the model cannot embed)
        or one batch too large for the device must cost its own caller's draw, not every group
        sharing the batch (docs/design.md §15.31 The circuit breaker judges rows, not draws)."""
        try:
            completions = self.policy.generate([p for p, n, _ in chunk for _ in range(n)], **kw)
        except Exception as exc:
            if len(chunk) == 1:
                raise
            log.warning("local sampler: a batch of %d calls failed (%r); answering each alone", len(chunk), exc)
            for call in chunk:
                try:
                    self._generate_for([call], kw)
                except Exception as alone:
                    _fail([call[2]], alone)
            return
        start = 0
        for _, n, fut in chunk:
            if not fut.done():  # a caller may have been cancelled meanwhile
                fut.set_result(completions[start:start + n])
            start += n


def batches(calls: list[tuple[list[int], int, asyncio.Future]], max_rows: int | None) -> list[list]:
    """Consecutive calls grouped so that each group asks for at most ``max_rows`` rows (a
    call asking for more goes alone: its ``n`` completions are never split)."""
    out: list[list] = []
    rows = 0
    for call in calls:
        if not out or (max_rows is not None and rows + call[1] > max_rows):
            out.append([])
            rows = 0
        out[-1].append(call)
        rows += call[1]
    return out


def _fail(futures: list[asyncio.Future], exc: BaseException) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(exc)
