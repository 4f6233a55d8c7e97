"""Micro-batches: the rows of a (mini)batch packed by length into forwards of at most
``trainer.micro_batch_tokens`` padded tokens, and the sums that make the step accumulated
over them the whole batch's step (docs/design.md §15.39 Micro-batches sum to the
whole-batch step). Pure functions of lengths and metrics; the forwards are ``optimize``'s.

Budget: a micro-batch of r rows whose longest row has n tokens costs r·n padded tokens
(the forward's activations and logits grow with it). Rows are sorted longest first, so a
micro-batch's first row sets its width and padding stays small; a row longer than the
budget alone still trains, alone.

Across trainer ranks every rank runs as many forwards as the others (``ranks.even_out``); a
rank with fewer rows than forwards runs placeholders: an empty row set, whose forward is
``placeholder``'s two tokens with nothing trained (loss 0, gradient 0, no metric weight).
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator

import torch

from rlstream.core.errors import RlstreamError
from rlstream.trainer.batch import Batch

# compute_loss metrics that add up over micro-batches; every other one is a mean over
# active tokens, so it is re-weighted by them (a mean of means would weigh a micro-batch
# of 3 tokens like one of 3000), but for the per-sample means, re-weighted by their samples.
SUMMED = frozenset({"active_tokens", "mean_loss", "inference_samples"})
PER_SAMPLE = frozenset({"inference_k1", "inference_k3"})  # weighted by "inference_samples"


def pack_by_length(lengths_B: torch.Tensor, rows: torch.Tensor, budget: int | None) -> list[torch.Tensor]:
    """``rows`` (indices into the batch) in micro-batches of at most ``budget`` padded
    tokens: longest first (ties in row order), each filled greedily while rows × its first
    (longest) row's length fits. ``budget`` None: one micro-batch holding ``rows`` as given."""
    if budget is None:
        return [rows]
    order = sorted(rows.tolist(), key=lambda i: -int(lengths_B[i]))  # stable: ties keep row order
    packed: list[list[int]] = []
    width = 0
    for i in order:
        if not packed or (len(packed[-1]) + 1) * width > budget:
            packed.append([])
            width = int(lengths_B[i])  # the longest row of the new micro-batch
        packed[-1].append(i)
    return [torch.tensor(p, dtype=torch.long) for p in packed]


def rows_of(batch: Batch, rows: torch.Tensor) -> Batch:
    """The micro-batch of ``rows``, cut to its longest row (N tokens) and its targets cut to
    those from its first trained one on (the columns before it hold no trained target in any
    row: a prompt's, whose logits nothing reads; docs/design.md §15.97 Logits only where a
    target is trained). Both read from the device at once."""
    mask_B_T = batch.mask_B_T[rows] != 0
    T = mask_B_T.shape[1]
    # a row's first trained column (argmax: the first of its maxima); T for a row with none
    first_B = torch.where(mask_B_T.any(-1), mask_B_T.byte().argmax(-1), T)
    N, skip = map(int, torch.stack([batch.attention_B_N[rows].sum(-1).max(), first_B.min()]).tolist())
    end = N - 1 - batch.first  # the targets the longest row has, in the batch's columns
    # (a batch already cut is cut again only with rows that reach past its first column: its own rows)
    assert end > 0 or batch.first == 0, f"rows ending at token {N} have no target past column {batch.first}"
    skip = min(skip, max(end - 1, 0))  # no trained target at all: one column left, the loss of nothing
    adv_B_T = None if batch.advantages_B_T is None else batch.advantages_B_T[rows, skip:end]
    return Batch(batch.tokens_B_N[rows, :N], batch.attention_B_N[rows, :N], batch.inf_logprobs_B_T[rows, skip:end],
                 batch.mask_B_T[rows, skip:end], batch.advantages_B[rows], adv_B_T, first=batch.first + skip)


def placeholder(batch: Batch) -> Batch:
    """A forward that trains nothing: the first two tokens of the batch's first row with an
    empty mask (``compute_loss`` gives 0 with its graph intact, so its backward runs the
    collectives of a real one and adds 0 to every gradient)."""
    N = min(2, batch.tokens_B_N.shape[1])
    adv_B_T = None if batch.advantages_B_T is None else torch.zeros_like(batch.advantages_B_T[:1, :N - 1])
    return Batch(batch.tokens_B_N[:1, :N], torch.ones_like(batch.attention_B_N[:1, :N]),
                 torch.zeros_like(batch.inf_logprobs_B_T[:1, :N - 1]), torch.zeros_like(batch.mask_B_T[:1, :N - 1]),
                 torch.zeros_like(batch.advantages_B[:1]), adv_B_T)


def micro_of(batch: Batch, rows: torch.Tensor) -> Batch:
    """``rows_of``, or the placeholder for an empty row set."""
    return rows_of(batch, rows) if len(rows) else placeholder(batch)


def padded_tokens(lengths_B: torch.Tensor, micro: list[torch.Tensor]) -> int:
    """Tokens the forwards of ``micro`` hold, padding included: Σ rows × longest row."""
    return sum(len(rows) * int(lengths_B[rows].max()) for rows in micro if len(rows))


class MicroMetrics:
    """``compute_loss`` metrics of a minibatch's micro-batches, summed so that ``result()``
    is what ``compute_loss`` reports on the whole minibatch (to float rounding): sums
    (the loss is already each micro-batch's share of the minibatch's) and token-weighted
    means."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict[str, float]) -> None:
        tokens, samples = metrics["active_tokens"], metrics.get("inference_samples", 0.0)
        for key, value in metrics.items():
            weight = samples if key in PER_SAMPLE else tokens
            # A micro-batch with no active token has mean 0 and weight 0: 0, never NaN.
            self.sums[key] += value if key in SUMMED else (value * weight if weight else 0.0)

    def result(self) -> dict[str, float]:
        tokens, samples = max(self.sums["active_tokens"], 1.0), max(self.sums.get("inference_samples", 0.0), 1.0)
        return {key: value if key in SUMMED else value / (samples if key in PER_SAMPLE else tokens)
                for key, value in self.sums.items()}


@contextlib.contextmanager
def fits_in_memory(lengths_B: torch.Tensor, budget: int | None) -> Iterator[None]:
    """Turn an allocation failure inside the step into what to do about it: the step was not
    committed, so its samples stay pending and a restarted trainer retrains them."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError (CUDA), or the CPU allocator's refusal
        if not isinstance(exc, torch.OutOfMemoryError) and "can't allocate memory" not in str(exc):
            raise
        longest, rows = int(lengths_B.max()), len(lengths_B)
        now = f"trainer.micro_batch_tokens = {budget}" if budget else "trainer.micro_batch_tokens unset (one forward " \
            f"of {rows} x {longest} = {rows * longest} padded tokens)"
        alone = f"; a row longer than the budget trains alone, and this batch has one of {longest} tokens: lower " \
            "max_seq_len" if budget and longest > budget else ""
        raise RlstreamError(
            f"the training step ran out of memory ({str(exc).splitlines()[0][:200]}) with {now}{alone}. Nothing was "
            "committed: the samples stay pending. Set trainer.micro_batch_tokens (or halve it), or trainer.dtype = "
            "\"bfloat16\" and trainer.gradient_checkpointing = true, then restart the trainer (`rlstream up --run-id "
            "<id>` resumes the run)") from exc
