"""Streaming accumulation (``trainer.streaming``, the cookbook's pipeline chunks): the
forward/backward of a batch's groups runs as they arrive, while the rest of the batch is
still being sampled, and the one optimizer step is taken when the batch is complete.

Exact, not approximate (docs/design.md §15.70 Streaming accumulation divides last): every
normalisation divides the batch's loss *sum* by a count of the whole batch (its active
tokens, its sequences, or 1), which is unknown until the last group arrives. So each
micro-batch backpropagates its loss sum (denominator 1), the counts add up as groups
arrive, and the accumulated gradient is divided by the whole batch's denominator just
before clipping, as ``clip_and_step`` does for float16's scaled backward. The step equals
the whole-batch one to float rounding; only the order of the additions differs.

Chunks: arrived samples wait until they fill micro-batches of ``micro_batch_tokens``
(packed by length, as ``micro_batch``); every full micro-batch runs at once, and the last
one (of the shortest rows) waits for more groups while it has room for another row, or for
the end of the batch. One minibatch only (``ppo_n_minibatches = 1``, checked by the config): with
more, every minibatch after the first needs the weights the first one's step produced.

Across trainer ranks (docs/design.md §15.81 Exact steps across trainer ranks) every rank
``add``s the same groups; each arriving sample goes to one rank (``ranks.assign``: balanced by
Σ L² over the step so far), every rank runs as many full micro-batches as the rank with the
fewest (the rest wait), gradients stay unreduced until the last backward of ``finish``, and
the counts, the finite decision and the metrics are summed over the ranks before the division.
"""
from __future__ import annotations

import math
import time

import torch

from rlstream.core.config import Config
from rlstream.trainer.batch import Group, collate
from rlstream.trainer.losses import denominator_of
from rlstream.trainer.micro_batch import (
    MicroMetrics,
    fits_in_memory,
    pack_by_length,
    padded_tokens,
    placeholder,
    rows_of,
)
from rlstream.trainer.optimize import (
    clip_and_step,
    frozen_logprobs,
    micro_loss,
    phase_clock,
    shares_prefixes,
    update_report,
)
from rlstream.trainer.precision import Precision
from rlstream.trainer.ranks import SINGLE, Ranks, assign, even_out


class StreamingStep:
    """One optimizer step accumulated chunk by chunk: ``add`` the groups as they become
    ready, ``finish`` once the batch is complete. ``streamed_samples`` counts the samples
    whose forward/backward ran before ``finish``; ``compute_time`` the seconds ``add`` spent."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, cfg: Config, pad_id: int,
                 device: torch.device, precision: Precision, ref_model: torch.nn.Module | None = None,
                 ranks: Ranks = SINGLE):
        self.model, self.optimizer, self.cfg, self.ref_model = model, optimizer, cfg, ref_model
        self.pad_id, self.device, self.precision, self.ranks = pad_id, device, precision, ranks
        self.loads = [0] * ranks.world  # Σ L² of the samples each rank was assigned this step
        self.groups: list[Group] = []
        # (sample, its advantage, its per-token advantages or None) not yet forwarded
        self.waiting: list[tuple[object, torch.Tensor, torch.Tensor | None]] = []
        self.metrics, self.finite = MicroMetrics(), True
        self.tokens = self.sequences = self.padded = self.trained_tokens = self.micro_batches = 0
        self.streamed_samples, self.compute_time = 0, 0.0
        self.final_time = self.optim_time = 0.0  # the rest of the batch's forwards/backwards, the optimizer step
        optimizer.zero_grad(set_to_none=True)

    def add(self, groups: list[Group]) -> None:
        """Groups of the batch (scored): forward/backward on every full micro-batch they make."""
        t0 = time.monotonic()
        self.groups += groups
        arrived = [(s, a, None if g.token_advantages is None else g.token_advantages[i])
                   for g in groups for i, (s, a) in enumerate(zip(g.samples, g.advantages_G))]
        if self.ranks.distributed:  # this rank's share of them
            shares, self.loads = assign(torch.tensor([len(s.tokens) for s, _, _ in arrived]), self.loads)
            arrived = [arrived[i] for i in shares[self.ranks.rank].tolist()]
        self.waiting += arrived
        self.streamed_samples += self.run(final=False)
        self.compute_time += time.monotonic() - t0

    def finish(self, lr: float) -> dict[str, float]:
        """The rest of the batch, then the optimizer step at ``lr``: the ``train/`` metrics of
        ``optimize.policy_update`` for the same batch (to float rounding)."""
        t0 = phase_clock(self.device)
        self.run(final=True)
        self.final_time = phase_clock(self.device) - t0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        tokens, sequences, finite = self.tokens, self.sequences, self.finite
        if self.ranks.distributed:  # the whole batch's counts and decision, on every rank
            finite = self.ranks.all_agree(finite)
            sums = self.metrics.sums
            tokens, sequences, self.padded, self.trained_tokens, self.streamed_samples, *values = self.ranks.all_sum(
                [tokens, sequences, self.padded, self.trained_tokens, self.streamed_samples, *sums.values()])
            sums.update(zip(list(sums), values))
        denominator = denominator_of(int(tokens), int(sequences), self.cfg.normalization)
        t0 = phase_clock(self.device)
        grad_norm, applied = clip_and_step(self.model, self.optimizer, finite, self.cfg.grad_clip_norm,
                                           scale=denominator, ranks=self.ranks)
        self.optim_time = phase_clock(self.device) - t0
        metrics = self.metrics.result()
        metrics["mean_loss"] /= denominator  # each micro-batch reported its loss sum
        metrics.update(loss=metrics["mean_loss"], grad_norm=grad_norm, minibatches=1.0)
        padding_share = 1.0 - self.trained_tokens / self.padded if self.padded else 0.0
        return update_report(self.model, [(metrics, applied)], lr=lr, micro_batches=self.micro_batches,
                             padding_share=padding_share, ranks=self.ranks)

    def perf(self) -> dict[str, float]:
        """How much of the step ran while its batch was still being sampled."""
        samples = sum(len(g.members) for g in self.groups)
        return {"perf/streamed_share": self.streamed_samples / samples if samples else 0.0,
                "perf/streamed_compute_time": self.compute_time,
                # the forward/backward of every chunk (the reference's forward among them), then the step
                "perf/fwd_bwd_time": self.compute_time + self.final_time, "perf/optim_step_time": self.optim_time}

    def run(self, *, final: bool) -> int:
        """Forward/backward the waiting samples' full micro-batches (all of them when ``final``);
        the number of samples that ran."""
        if not self.waiting and not self.ranks.distributed:
            return 0
        batch, now, later = None, [], []
        lengths_B = torch.zeros(0, dtype=torch.long)
        if self.waiting:
            samples, advantages, per_token = zip(*self.waiting)
            batch = collate(list(samples), torch.stack(list(advantages)), self.pad_id, self.device,
                            None if all(t is None for t in per_token) else list(per_token))
            lengths_B = batch.attention_B_N.sum(-1).cpu()
            micro = pack_by_length(lengths_B, torch.arange(len(lengths_B)), self.cfg.trainer.micro_batch_tokens)
            budget, last = self.cfg.trainer.micro_batch_tokens, micro[-1]
            room = (len(last) + 1) * int(lengths_B[last].max()) <= budget  # the last one could take another row
            now, later = (micro[:-1], micro[-1:]) if room and not final else (micro, [])
        if self.ranks.distributed:
            now, later = self.in_step(now, later, lengths_B, final)
        with fits_in_memory(lengths_B, self.cfg.trainer.micro_batch_tokens):
            for n, rows in enumerate(now):
                # gradients reduced once, by the step's last backward
                self.ranks.sync_gradients(self.model, final and n == len(now) - 1)
                self.backward(rows_of(batch, rows) if len(rows) else placeholder(batch or self.first()))
        self.padded += padded_tokens(lengths_B, now)
        self.trained_tokens += sum(int(lengths_B[rows].sum()) for rows in now)
        self.micro_batches += len(now)
        self.waiting = [self.waiting[i] for rows in later for i in rows.tolist()]
        return sum(len(rows) for rows in now)

    def in_step(self, now: list[torch.Tensor], later: list[torch.Tensor], lengths_B: torch.Tensor,
                final: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The micro-batches to run now and those that wait, as many now on every rank: while
        the batch streams, the fewest any rank has full (the rest wait for the next call); at
        the end, all of them, evened out to the most any rank has (at least one, the backward
        that reduces the gradients)."""
        if not final:
            n = self.ranks.all_min(len(now))
            return now[:n], now[n:] + later
        return even_out(now, lengths_B, max(1, self.ranks.all_max([len(now)])[0])), []

    def first(self):
        """A batch of the step's first sample: what a rank with no sample of its own forwards."""
        group = self.groups[0]
        return collate([group.samples[0]], group.advantages_G[:1], self.pad_id, self.device,
                       None if group.token_advantages is None else group.token_advantages[:1])

    def backward(self, mb) -> None:
        """One micro-batch: its loss sum backpropagated (gradients add up in ``.grad``). Once a
        loss is not finite the remaining forwards run without a graph and the step is skipped."""
        mask_B_T = mb.mask_B_T != 0
        tokens, sequences = torch.stack([mask_B_T.sum(), mask_B_T.any(-1).sum()]).tolist()  # one read of the device
        self.tokens, self.sequences = self.tokens + tokens, self.sequences + sequences
        old_B_T = mb.inf_logprobs_B_T if self.cfg.anchor_logp == "rollout" else None
        ref_B_T = None if self.ref_model is None else frozen_logprobs(
            self.ref_model, mb, [torch.arange(len(mb.advantages_B))], self.cfg.temperature, self.precision,
            shared_prefix=shares_prefixes(self.cfg, self.ranks))
        graph = self.finite or self.ranks.distributed  # across ranks every backward runs: each is a collective
        loss, metrics = micro_loss(self.model, mb, old_B_T, ref_B_T, cfg=self.cfg, precision=self.precision,
                                   denominator=1.0, grad=graph, ranks=self.ranks)
        self.metrics.add(metrics)
        self.finite = self.finite and math.isfinite(metrics["mean_loss"])  # the loss, as read back
        if self.finite or self.ranks.distributed:
            loss.backward()
