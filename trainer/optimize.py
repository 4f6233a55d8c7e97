"""One rollout batch -> ``min(ppo_n_minibatches, B)`` optimizer steps (the PPO inner loop).

Old-policy logprobs are fixed once per rollout batch, before any update, so that from
the second minibatch on the ratio moves away from 1 and the clip acts:
- ``anchor_logp = "old_policy"``: the current weights' logprobs. With a single minibatch
  they equal the live forward's, detached (the forward runs without dropout, see
  ``token_logprobs``), so that forward is reused (one forward less);
- ``anchor_logp = "rollout"``: the behaviour logprobs from the worker (then the TIS weight
  exp(old - inf) is 1 by construction).

Each minibatch's step is accumulated over micro-batches of at most
``trainer.micro_batch_tokens`` padded tokens (``micro_batch``): every micro-batch's loss is
divided by its *minibatch's* normaliser, so the losses, gradients and metrics add up to the
minibatch's, whatever the budget (docs/design.md §15.39 Micro-batches sum to the whole-batch
step). The old-policy and reference forwards run on the same micro-batches, without a graph.
Forwards compute in ``trainer.dtype`` (``precision``).

A minibatch whose loss or gradient norm is not finite is skipped: its gradients are dropped
and the optimizer does not step (``train/nonfinite_skipped`` counts them). The decision is a
function of the batch and the weights, so a replay makes it again. Weights that are not all
finite after the update stop the trainer before anything is committed or published
(docs/design.md §15.33 Non-finite steps are skipped, never published).

Across trainer ranks (``ranks``; docs/design.md §15.81 Exact steps across trainer ranks) each
rank trains its share of every minibatch's rows, with as many forwards as every other rank;
the normaliser, the finite decision, the gradient norm and the metrics are the whole
minibatch's, so the step is the one-process step. In one process (``ranks.SINGLE``) nothing
below calls a collective.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict

import torch

from rlstream.core.config import Config
from rlstream.core.errors import RlstreamError
from rlstream.trainer.batch import Batch
from rlstream.trainer.losses import LossConfig, compute_loss
from rlstream.trainer.micro_batch import MicroMetrics, fits_in_memory, micro_of, pack_by_length, padded_tokens
from rlstream.trainer.policy_model import all_finite, tensors_finite, token_logprobs
from rlstream.trainer.precision import Precision
from rlstream.trainer.ranks import SINGLE, Ranks, even_out, local

FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")  # where torch 2.13 has the fused AdamW kernel


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with ``[trainer]``'s ``beta1``, ``beta2``, ``eps``, ``weight_decay``: by default
    (0.9, 0.95), 1e-8, 0.01 on every weight (the cookbook's seeds pass beta2 0.999; 0.95 is
    OpenRLHF's, a shorter second-moment memory for the non-stationary RL gradient, and what
    every measurement in docs/benchmarks.md was taken with). The LR is overwritten each step by
    :func:`policy_update`.
    Only trainable parameters: with LoRA, the adapters (the frozen base has no state).

    The fused kernel (one kernel for every tensor's update) where the parameters' device has
    it (CUDA, the CPU, ...), as Hugging Face's Trainer defaults to: on the built-in model's CPU
    step 0.18 ms against 0.77 for torch's default per-tensor loop; elsewhere torch's default
    (docs/design.md §15.96 AdamW runs fused where the device has the kernel)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    t = cfg.trainer
    # torch checks the device only at the first step: a parameter elsewhere would fail there
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in trainable) or None
    return torch.optim.AdamW(trainable, lr=cfg.learning_rate, betas=(t.beta1, t.beta2),
                             weight_decay=t.weight_decay, eps=t.eps, fused=fused)


def minibatch_indices(B: int, K: int) -> list[torch.Tensor]:
    """Split ``B`` samples into ``min(K, B)`` contiguous, non-empty index slices.

    A batch can hold fewer than K samples (the final partial batch when the data runs out,
    a small incomplete group, a replayed step), and an empty slice would crash the forward.
    """
    return list(torch.arange(B).tensor_split(min(K, B)))


def policy_update(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, *, cfg: Config,
                  lr: float, ref_model: torch.nn.Module | None = None,
                  precision: Precision | None = None, ranks: Ranks = SINGLE) -> dict[str, float]:
    """Run k = min(K, B) optimizer steps on one rollout batch, each accumulated over its
    slice's micro-batches; return ``train/`` metrics averaged over the k steps
    (``train/minibatches`` = k), the micro-batch count and the padding share. With several
    ``ranks``, every rank calls it on the same batch and trains its share of each slice."""
    precision = precision or Precision()
    lengths_B = batch.attention_B_N.sum(-1).cpu()  # packing reads every length: one device sync, not B
    plan = [pack_by_length(lengths_B, ranks.share(lengths_B, idx), cfg.trainer.micro_batch_tokens)
            for idx in minibatch_indices(len(lengths_B), cfg.ppo_n_minibatches)]
    if ranks.distributed:  # as many forwards on every rank, minibatch by minibatch
        plan = [even_out(micro, lengths_B, n) for micro, n in zip(plan, ranks.all_max([len(m) for m in plan]))]
    k, every_micro = len(plan), [rows for micro in plan for rows in micro]
    for group in optimizer.param_groups:
        group["lr"] = lr

    device, phases = batch.tokens_B_N.device, defaultdict(float)  # the perf/ forward-time family
    with fits_in_memory(lengths_B, cfg.trainer.micro_batch_tokens):
        old_B_T = None
        t0 = phase_clock(device)
        if cfg.anchor_logp == "rollout":
            old_B_T = batch.inf_logprobs_B_T
        elif k > 1:
            old_B_T = frozen_logprobs(model, batch, every_micro, cfg.temperature, precision,
                                      shared_prefix=shares_prefixes(cfg, ranks))
        t1 = phase_clock(device)
        ref_B_T = None if ref_model is None else frozen_logprobs(ref_model, batch, every_micro, cfg.temperature,
                                                                 precision, shared_prefix=shares_prefixes(cfg, ranks))
        phases["fwd_bwd_time"], phases["ref_forward_time"] = t1 - t0, phase_clock(device) - t1
        steps = [minibatch_step(model, optimizer, batch, micro, old_B_T, ref_B_T, cfg=cfg, precision=precision,
                                ranks=ranks, phases=phases) for micro in plan]
    padded = padded_tokens(lengths_B, every_micro)
    if ranks.distributed:
        padded = ranks.all_sum([padded])[0]
    padding_share = 1.0 - float(lengths_B.sum()) / padded
    report = update_report(model, steps, lr=lr, micro_batches=len(every_micro), padding_share=padding_share,
                           ranks=ranks)
    return report | {f"perf/{name}": seconds for name, seconds in phases.items()
                     if name != "ref_forward_time" or ref_model is not None}


def phase_clock(device: torch.device) -> float:
    """Seconds for the step's phase timers; on CUDA once the device's queued work is done (a
    phase would otherwise time its kernels' launch, not their run): 3 + 3 per minibatch syncs
    a step, beside the loss's and the gradient norm's own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def update_report(model: torch.nn.Module, steps: list[tuple[dict[str, float], bool]], *, lr: float,
                  micro_batches: int, padding_share: float, ranks: Ranks = SINGLE) -> dict[str, float]:
    """The ``train/`` metrics of a rollout batch's minibatch steps ((metrics, applied) each),
    averaged over the applied ones; raise when the update left a weight non-finite (on any
    rank: every rank raises). ``micro_batches``: the forwards each rank ran."""
    sums: dict[str, float] = defaultdict(float)  # metrics of the applied minibatches
    skipped: dict[str, float] = defaultdict(float)  # ... and of the skipped ones
    for metrics, applied in steps:
        for key, value in metrics.items():
            (sums if applied else skipped)[key] += value
    k, n_applied = len(steps), int(sums["minibatches"])
    if n_applied and not weights_finite(model, ranks):
        raise RlstreamError(f"the update made weights non-finite at lr {lr:g} although every applied loss and "
                            "gradient norm was finite; nothing was committed or published. Lower learning_rate "
                            "or set grad_clip_norm, then restart the trainer")
    # The step's metrics average the applied minibatches; when none was, the skipped ones (non-finite) show why.
    reported = sums if n_applied else skipped
    out = {f"train/{key}": value / reported["minibatches"] for key, value in reported.items()}
    out["train/active_tokens"] = reported["active_tokens"]  # a count: summed, not averaged
    out.pop("train/inference_samples", None)  # the weight of inference_k1/k3, not a metric of its own
    out["train/lr"] = lr
    out["train/minibatches"] = k
    out["train/nonfinite_skipped"] = k - n_applied
    out["train/micro_batches"] = micro_batches
    out["perf/padding_share"] = padding_share
    return out


def minibatch_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch,
                   micro: list[torch.Tensor], old_B_T: torch.Tensor | None, ref_B_T: torch.Tensor | None, *,
                   cfg: Config, precision: Precision, ranks: Ranks = SINGLE,
                   phases: dict[str, float] | None = None) -> tuple[dict[str, float], bool]:
    """One optimizer step on the minibatch made of ``micro``'s rows: (its ``compute_loss``
    metrics with ``loss``, ``grad_norm``, ``minibatches`` = 1; whether the step was applied).

    Each micro-batch's loss is its share of the minibatch's (the minibatch's normaliser
    divides it), so the shares' gradients accumulate to the minibatch's gradient. Once a
    share is not finite, the remaining forwards run without a graph (metrics only) and the
    step is skipped. Across ranks ``micro`` is this rank's share, the normaliser is the whole
    minibatch's, every backward runs (each is a collective; a non-finite one is dropped with
    the step, which every rank skips alike), and gradients are reduced on the last one only.
    ``phases``: where to add the seconds of its forwards/backwards and of its optimizer step."""
    t0 = phase_clock(batch.tokens_B_N.device)
    rows_B = torch.cat(micro)
    denominator = ranks.denominator(batch.mask_B_T[rows_B], cfg.normalization)
    scale = denominator if precision.scales_backward else 1.0  # float16: per-token gradients of order 1
    optimizer.zero_grad(set_to_none=True)
    acc, finite = MicroMetrics(), True
    for n, rows in enumerate(micro):
        mb = micro_of(batch, rows)
        cols = slice(mb.first - batch.first, mb.first - batch.first + mb.mask_B_T.shape[1])  # mb's, in batch's
        empty = not len(rows)  # a placeholder (ranks.even_out): nothing trained, the mask holds no token
        old = None if old_B_T is None or empty else old_B_T[rows, cols]
        ref = None if ref_B_T is None else torch.zeros_like(mb.inf_logprobs_B_T) if empty else ref_B_T[rows, cols]
        graph = finite or ranks.distributed
        ranks.sync_gradients(model, n == len(micro) - 1)
        loss, metrics = micro_loss(model, mb, old, ref, cfg=cfg, precision=precision, denominator=denominator,
                                   grad=graph, ranks=ranks)
        acc.add(metrics)
        finite = finite and math.isfinite(metrics["mean_loss"])  # the loss as the metrics read it back
        if finite or ranks.distributed:
            (loss * scale if scale != 1.0 else loss).backward()
    if ranks.distributed:
        finite = ranks.all_agree(finite)
        acc.sums.update(zip(list(acc.sums), ranks.all_sum(list(acc.sums.values()))))
    t1 = phase_clock(batch.tokens_B_N.device)
    grad_norm, applied = clip_and_step(model, optimizer, finite, cfg.grad_clip_norm, scale, ranks=ranks)
    if phases is not None:
        phases["fwd_bwd_time"] += t1 - t0
        phases["optim_step_time"] += phase_clock(batch.tokens_B_N.device) - t1
    metrics = acc.result()
    metrics.update(loss=metrics["mean_loss"], grad_norm=grad_norm, minibatches=1.0)
    return metrics, applied


def micro_loss(model: torch.nn.Module, mb: Batch, old_B_T: torch.Tensor | None, ref_B_T: torch.Tensor | None, *,
               cfg: Config, precision: Precision, denominator: float, grad: bool,
               ranks: Ranks = SINGLE) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's forward and loss (its share: ``denominator`` is its (mini)batch's) with
    its metrics; ``old_B_T`` None = the live forward's own logprobs, detached."""
    with torch.set_grad_enabled(grad), precision.autocast():
        logprobs_B_T = token_logprobs(model, mb.tokens_B_N, mb.attention_B_N, cfg.temperature, mb.first,
                                      shared_prefix=shares_prefixes(cfg, ranks))
    return compute_loss(cfg.policy_loss, logprobs_B_T, logprobs_B_T.detach() if old_B_T is None else old_B_T,
                        mb.inf_logprobs_B_T, mb.advantages, mb.mask_B_T, ref_logprobs=ref_B_T,
                        config=LossConfig.of(cfg), denominator=denominator)


def shares_prefixes(cfg: Config, ranks: Ranks) -> bool:
    """``trainer.shared_prefix`` in one process; across trainer ranks the plain forward (docs/design.md
    §15.100 A group's prompt is computed once): each rank would choose one forward or two from its
    own rows, and FSDP's ranks must run the same forwards, each forward's gathers of the weights
    being collectives. Decided from the ranks torchrun started, which the config may not know of."""
    return cfg.trainer.shared_prefix and not ranks.distributed


@torch.no_grad()
def frozen_logprobs(model: torch.nn.Module, batch: Batch, micro: list[torch.Tensor], temperature: float,
                    precision: Precision, *, shared_prefix: bool = False) -> torch.Tensor:
    """(B, T) logprobs of weights no step of this batch changes (the old policy before the
    update, the reference), on the training forwards' micro-batches (their columns); 0 past
    each row's end and before its micro-batch's first trained target (``rows_of``)."""
    out_B_T = torch.zeros_like(batch.inf_logprobs_B_T)
    for rows in micro:
        mb = micro_of(batch, rows)
        with precision.autocast():
            logprobs_B_T = token_logprobs(model, mb.tokens_B_N, mb.attention_B_N, temperature, mb.first,
                                          shared_prefix=shared_prefix)
        if len(rows):  # a placeholder's forward only keeps the ranks' collectives in step
            start = mb.first - batch.first
            out_B_T[rows, start:start + mb.mask_B_T.shape[1]] = logprobs_B_T
    return out_B_T


def clip_and_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, finite: bool, clip: float | None,
                  scale: float = 1.0, ranks: Ranks = SINGLE) -> tuple[float, bool]:
    """Clip and step on the accumulated gradients (divided by the backward's ``scale``
    first): (the gradient norm before clipping, whether the step was applied). A non-finite
    loss or gradient norm applies nothing: stepping would write NaN into the weights and into
    AdamW's moments, from which no later step recovers. Across ranks ``finite`` is already
    every rank's, and the norm is the whole gradient's (its shards' norms combined), so
    every rank clips by the same coefficient and decides alike."""
    if not finite:
        optimizer.zero_grad(set_to_none=True)
        return float("nan"), False
    if scale != 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(scale)
    if ranks.distributed:
        grad_norm = global_clip(model, clip)
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip or float("inf"))
    norm = float(grad_norm)  # one read of the device, for the decision and the metric
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return norm, False
    optimizer.step()
    return norm, True


def global_clip(model: torch.nn.Module, clip: float | None) -> torch.Tensor:
    """``clip_grad_norm_`` on sharded gradients: the norm of the whole gradient (FSDP's
    gradients are DTensors, whose norm is a partial one until ``full_tensor`` combines the
    ranks'), then every shard scaled by the coefficient it gives."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, clip or float("inf"), norm)
    return norm


def weights_finite(model: torch.nn.Module, ranks: Ranks = SINGLE) -> bool:
    """``all_finite`` of the model; across ranks, of every rank's shards, agreed."""
    if not ranks.distributed:
        return all_finite(model)
    return ranks.all_agree(tensors_finite(local(p) for p in model.parameters()))
