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
"""
from __future__ import annotations

import time

import torch

from rlstream.core.config import Config
from rlstream.trainer.batch import Group, collate
from rlstream.trainer.losses import denominator_of
from rlstream.trainer.micro_batch import MicroMetrics, fits_in_memory, pack_by_length, padded_tokens, rows_of
from rlstream.trainer.optimize import clip_and_step, frozen_logprobs, micro_loss, update_report
from rlstream.trainer.precision import Precision


class StreamingStep:
    """One optimizer step accumulated chunk by chunk: ``add`` the groups as they become
    ready, ``finish`` once the batch is complete. ``streamed_samples`` counts the samples
    whose forward/backward ran before ``finish``; ``compute_time`` the seconds ``add`` spent."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, cfg: Config, pad_id: int,
                 device: torch.device, precision: Precision, ref_model: torch.nn.Module | None = None):
        self.model, self.optimizer, self.cfg, self.ref_model = model, optimizer, cfg, ref_model
        self.pad_id, self.device, self.precision = pad_id, device, precision
        self.groups: list[Group] = []
        self.waiting: list[tuple[object, torch.Tensor]] = []  # (sample, its advantage) not yet forwarded
        self.metrics, self.finite = MicroMetrics(), True
        self.tokens = self.sequences = self.padded = self.trained_tokens = self.micro_batches = 0
        self.streamed_samples, self.compute_time = 0, 0.0
        optimizer.zero_grad(set_to_none=True)

    def add(self, groups: list[Group]) -> None:
        """Groups of the batch (scored): forward/backward on every full micro-batch they make."""
        t0 = time.monotonic()
        self.groups += groups
        self.waiting += [(s, a) for g in groups for s, a in zip(g.samples, g.advantages_G)]
        self.streamed_samples += self.run(final=False)
        self.compute_time += time.monotonic() - t0

    def finish(self, lr: float) -> dict[str, float]:
        """The rest of the batch, then the optimizer step at ``lr``: the ``train/`` metrics of
        ``optimize.policy_update`` for the same batch (to float rounding)."""
        self.run(final=True)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        denominator = denominator_of(self.tokens, self.sequences, self.cfg.normalization)
        grad_norm, applied = clip_and_step(self.model, self.optimizer, self.finite, self.cfg.grad_clip_norm,
                                           scale=denominator)
        metrics = self.metrics.result()
        metrics["mean_loss"] /= denominator  # each micro-batch reported its loss sum
        metrics.update(loss=metrics["mean_loss"], grad_norm=grad_norm, minibatches=1.0)
        padding_share = 1.0 - self.trained_tokens / self.padded if self.padded else 0.0
        return update_report(self.model, [(metrics, applied)], lr=lr, micro_batches=self.micro_batches,
                             padding_share=padding_share)

    def perf(self) -> dict[str, float]:
        """How much of the step ran while its batch was still being sampled."""
        samples = sum(len(g.members) for g in self.groups)
        return {"perf/streamed_share": self.streamed_samples / samples if samples else 0.0,
                "perf/streamed_compute_time": self.compute_time}

    def run(self, *, final: bool) -> int:
        """Forward/backward the waiting samples' full micro-batches (all of them when ``final``);
        the number of samples that ran."""
        if not self.waiting:
            return 0
        samples, advantages = zip(*self.waiting)
        batch = collate(list(samples), torch.stack(list(advantages)), self.pad_id, self.device)
        lengths_B = batch.attention_B_N.sum(-1).cpu()
        micro = pack_by_length(lengths_B, torch.arange(len(lengths_B)), self.cfg.trainer.micro_batch_tokens)
        budget, last = self.cfg.trainer.micro_batch_tokens, micro[-1]
        room = (len(last) + 1) * int(lengths_B[last].max()) <= budget  # the last one could take another row
        now, later = (micro[:-1], micro[-1:]) if room and not final else (micro, [])
        with fits_in_memory(lengths_B, self.cfg.trainer.micro_batch_tokens):
            for rows in now:
                self.backward(rows_of(batch, rows))
        self.padded += padded_tokens(lengths_B, now)
        self.trained_tokens += sum(int(lengths_B[rows].sum()) for rows in now)
        self.micro_batches += len(now)
        self.waiting = [self.waiting[i] for rows in later for i in rows.tolist()]
        return sum(len(rows) for rows in now)

    def backward(self, mb) -> None:
        """One micro-batch: its loss sum backpropagated (gradients add up in ``.grad``). Once a
        loss is not finite the remaining forwards run without a graph and the step is skipped."""
        mask_B_T = mb.mask_B_T != 0
        self.tokens += int(mask_B_T.sum())
        self.sequences += int(mask_B_T.any(-1).sum())
        old_B_T = mb.inf_logprobs_B_T if self.cfg.anchor_logp == "rollout" else None
        ref_B_T = None if self.ref_model is None else frozen_logprobs(
            self.ref_model, mb, [torch.arange(len(mb.advantages_B))], self.cfg.temperature, self.precision)
        loss, metrics = micro_loss(self.model, mb, old_B_T, ref_B_T, cfg=self.cfg, precision=self.precision,
                                   denominator=1.0, grad=self.finite)
        self.metrics.add(metrics)
        self.finite = self.finite and bool(torch.isfinite(loss))
        if self.finite:
            loss.backward()
