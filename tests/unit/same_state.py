"""Two computations of the same optimizer steps (the whole batch against micro-batches or
streamed chunks) compared step by step *from the same state*, with tolerances derived from
the magnitudes involved, so that the comparison holds on any x86-64 CPU whatever vector ISA
torch's kernels use (docs/design.md §13 Tests).

A trajectory through AdamW is not what the mathematics makes equal: the second computation's
rounding moves its weights, and every later step starts elsewhere. So the second computation
(``follow``) has its weights and AdamW state overwritten with the first's after every optimizer
step, and each step is compared on its own:

- the accumulated gradient, before the optimizer: each element is a sum over the batch's rows
  that the two computations add in another order (and in kernels of other shapes), so they may
  differ by ``GRAD_ROUNDING`` float32 unit roundoffs of the *magnitude of the summed terms*, not
  of the sum, which cancels (GRPO's advantages sum to zero within a group; the gradient of a
  key bias is zero, the softmax over keys being invariant to it). That magnitude is the step's
  largest Σ_rows |a row's gradient| (``magnitudes``: the rows' gradients one by one): every
  parameter's gradient is assembled from the same backward pass's activation gradients, so
  their rounding reaches a small gradient with the pass's magnitude, not its own;
- the weights after the step: AdamW maps a gradient off by δg to an update off by at most what
  ``adamw_bound`` computes from the state before the step (large where |g| is near ``eps``);
- the step's metrics: each is a mean over the batch's active tokens (or their count) of terms
  of order ``METRIC_SCALE``, so they may differ by ``GRAD_ROUNDING`` roundoffs of that scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

U = torch.finfo(torch.float32).eps / 2  # float32's unit roundoff, 2**-24
# Reordering a sum of n terms changes it by at most 2(n - 1)·U·Σ|terms| (each order's error is at
# most (n - 1)·U·Σ|terms|); with the batch's 12 rows that is 22·U. 32 leaves room for the kernels of
# other shapes inside each row's gradient (other blockings of the same dot products). Measured on
# AVX-512, AVX2 and the default ISA: at most 6.4·U.
GRAD_ROUNDING = 32
METRIC_SCALE = 4.0  # |advantage| · the (clipped) ratio · the TIS weight, plus the KL term: a few units


@dataclass
class Step:
    """One optimizer step as the optimizer saw it."""

    grads: list[torch.Tensor]
    before: list[torch.Tensor]
    state: list[tuple[torch.Tensor, torch.Tensor, float]]  # AdamW's (exp_avg, exp_avg_sq, step) before
    after: list[torch.Tensor] = field(default_factory=list)
    state_after: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    magnitudes: list[torch.Tensor] = field(default_factory=list)  # Σ_rows |row gradient|, when recorded


class StepRecorder:
    """Records every optimizer step of ``optimizer``; with ``follow``, after each step loads the
    weights and AdamW state that ``follow``'s step of the same index left, so that every step of
    this run starts from the state the other's did. ``magnitudes``: also the sum of the absolute
    gradients of the backward passes between two steps (one row each with a budget of 1)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 follow: StepRecorder | None = None, magnitudes: bool = False):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.follow, self.steps = optimizer, follow, []
        self.abs_sum: list[torch.Tensor] | None = None
        self.seen: dict[int, torch.Tensor] = {}
        optimizer.register_step_pre_hook(self.pre)
        optimizer.register_step_post_hook(self.post)
        if magnitudes:
            self.abs_sum = [torch.zeros_like(p) for p in self.params]
            for i, p in enumerate(self.params):
                p.register_post_accumulate_grad_hook(lambda p, i=i: self.accumulated(i, p))

    def accumulated(self, i: int, p: torch.Tensor) -> None:
        previous = self.seen.get(i)
        contribution = p.grad if previous is None or previous.shape != p.grad.shape else p.grad - previous
        self.abs_sum[i] += contribution.abs()
        self.seen[i] = p.grad.detach().clone()

    def pre(self, optimizer, args, kwargs) -> None:
        state = []
        for p in self.params:
            s = optimizer.state.get(p) or {}
            if s:
                state.append((s["exp_avg"].clone(), s["exp_avg_sq"].clone(), float(s["step"])))
            else:
                state.append((torch.zeros_like(p), torch.zeros_like(p), 0.0))
        self.steps.append(Step([p.grad.detach().clone() for p in self.params],
                               [p.detach().clone() for p in self.params], state))
        if self.abs_sum is not None:
            self.steps[-1].magnitudes = [a.clone() for a in self.abs_sum]
            for a in self.abs_sum:
                a.zero_()
            self.seen.clear()

    def post(self, optimizer, args, kwargs) -> None:
        step = self.steps[-1]
        step.after = [p.detach().clone() for p in self.params]
        step.state_after = [(optimizer.state[p]["exp_avg"].clone(), optimizer.state[p]["exp_avg_sq"].clone(),
                             optimizer.state[p]["step"].clone()) for p in self.params]
        if self.follow is None:
            return
        theirs = self.follow.steps[len(self.steps) - 1]
        with torch.no_grad():
            for p, w, (m, v, t) in zip(self.params, theirs.after, theirs.state_after):
                p.copy_(w)
                optimizer.state[p]["exp_avg"].copy_(m)
                optimizer.state[p]["exp_avg_sq"].copy_(v)
                optimizer.state[p]["step"].copy_(t)


def grad_tolerance(step: Step) -> float:
    """What an element of ``step``'s gradient may differ by (``step`` recorded its magnitudes)."""
    return GRAD_ROUNDING * U * max(float(m.max()) for m in step.magnitudes)


def adamw_bound(step: Step, i: int, dg: torch.Tensor, group: dict) -> torch.Tensor:
    """How far AdamW's step from ``step``'s state may move parameter ``i`` when its gradient is
    off by at most ``dg`` (elementwise), plus the rounding of the update's own operations."""
    lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    g, w = step.grads[i].double(), step.before[i].double()
    m0, v0, t = step.state[i]
    t += 1
    dg = dg.double()
    m = b1 * m0.double() + (1 - b1) * g
    v = b2 * v0.double() + (1 - b2) * g * g
    dm = (1 - b1) * dg
    dv = (1 - b2) * (2 * g.abs() * dg + dg * dg)
    c1, c2 = 1 - b1 ** t, (1 - b2 ** t) ** 0.5
    denom = v.sqrt() / c2 + eps
    ddenom = (v.sqrt() - (v - dv).clamp(min=0).sqrt()) / c2  # sqrt moves most downwards
    update = lr / c1 * m.abs() / denom
    dupdate = lr / c1 * (dm / (denom - ddenom) + m.abs() * ddenom / (denom * (denom - ddenom)))
    return (dupdate + 8 * U * ((1 + lr * wd) * w.abs() + update)).float()


def compare_steps(mine: StepRecorder, theirs: StepRecorder, rows: StepRecorder,
                  report: list[tuple[str, float]] | None = None) -> None:
    """Every step of ``mine`` against ``theirs`` (the same state before each), the gradients'
    magnitudes from ``rows`` (the same steps, one row per backward): gradients, then weights."""
    assert len(mine.steps) == len(theirs.steps) == len(rows.steps) > 0
    group = mine.optimizer.param_groups[0]
    for k, (a, b, r) in enumerate(zip(theirs.steps, mine.steps, rows.steps)):
        tol = grad_tolerance(r)
        for i, (ga, gb) in enumerate(zip(a.grads, b.grads)):
            assert torch.equal(a.before[i], b.before[i]), f"step {k}: not from the same state"
            err = float((gb - ga).abs().max())
            if report is not None:
                report.append((f"grad {k}.{i}", err / tol))
            assert err <= tol, f"step {k}, parameter {i}: gradient off by {err:.3g} where {tol:.3g} is allowed"
            bound = adamw_bound(a, i, torch.full_like(ga, tol), group)
            werr = (b.after[i] - a.after[i]).abs()
            if report is not None:
                report.append((f"weight {k}.{i}", float((werr / bound).max())))
            worst = int((werr - bound).argmax())
            assert bool((werr <= bound).all()), (
                f"step {k}, parameter {i}: weight off by {float(werr.flatten()[worst]):.3g} after the step where "
                f"{float(bound.flatten()[worst]):.3g} is allowed")


def compare_metrics(mine: dict[str, float], theirs: dict[str, float], rows: StepRecorder, steps: slice,
                    report: list[tuple[str, float]] | None = None, ignore: frozenset[str] = frozenset(),
                    normalization: str = "token_mean") -> None:
    """A step's ``train/`` metrics (averaged over its minibatch steps, ``steps`` of ``rows``): counts
    exactly; the gradient norm to the norm of the gradients' tolerance; every other one is a mean
    over the n active tokens of terms of order ``METRIC_SCALE``, which another order of the sum
    moves by at most 2(n - 1)·U·``METRIC_SCALE`` (the terms themselves are computed from logprobs
    that differ at rounding, well inside that), except the loss under ``token_sum``: a sum of those
    n terms, n times that."""
    # Wall-clock seconds (perf/fwd_bwd_time, perf/optim_step_time, ...) are never equal, and where they are
    # measured is up to each path (a streamed step times its chunks elsewhere).
    mine, theirs = ({k: v for k, v in m.items() if not k.endswith("_time")} for m in (mine, theirs))
    assert set(mine) == set(theirs)
    n = max(theirs.get("train/active_tokens", 1.0), 1.0)
    elements = sum(p.numel() for p in rows.params)
    norm_tol = max(grad_tolerance(r) for r in rows.steps[steps]) * elements ** 0.5
    for key in sorted(set(theirs) - ignore):
        if key in ("train/active_tokens", "train/minibatches", "train/nonfinite_skipped", "train/lr"):
            assert mine[key] == theirs[key], key
            continue
        tol = 2 * n * U * METRIC_SCALE
        if key in ("train/loss", "train/mean_loss") and normalization == "token_sum":
            tol *= n
        if key == "train/grad_norm":
            tol = norm_tol + 8 * U * abs(theirs[key])
        if report is not None:
            report.append((key, abs(mine[key] - theirs[key]) / tol))
        assert abs(mine[key] - theirs[key]) <= tol, f"{key}: {mine[key]!r} vs {theirs[key]!r}, {tol:.3g} allowed"
