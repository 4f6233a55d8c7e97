"""The 2-rank side of tests/unit/test_trainer_ranks.py, run under torchrun (``python -m
torch.distributed.run --standalone --nproc-per-node 2 tests/unit/ranks_cases.py REPORT``): every
case of ``CASES`` in one process group, so that start-up is paid once.

Each rank computes, for every case, the one-process step itself (``ranks.SINGLE``: an unsharded
model, no collective) and the same step across the two ranks (FSDP2, each rank its share), then
compares them step by step from the same state as tests/unit/same_state.py does for micro-batches:
the gradients before AdamW (gathered whole), the weights after it, the metrics; the tolerances
come from the gradients' magnitudes (a third, one-process run with one row per backward). The
sharded run follows the one-process run's weights and AdamW state after each optimizer step.
Rank 0 writes ``{case: {"ok": ..., "error": ..., "worst": ...}}`` as JSON to REPORT."""
from __future__ import annotations

import copy
import json
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # same_state, test_microbatch; factories

import torch  # noqa: E402
from factories import legacy_config  # noqa: E402
from same_state import Step, StepRecorder, U, compare_metrics, compare_steps, grad_tolerance  # noqa: E402
from test_microbatch import mixed_batch  # noqa: E402
from test_streaming import groups_of  # noqa: E402

from rlstream.builtin.tiny_model import build_model, save_tiny_model  # noqa: E402
from rlstream.torchrun import end_rank  # noqa: E402
from rlstream.trainer import lora  # noqa: E402
from rlstream.trainer.batch import collate  # noqa: E402
from rlstream.trainer.losses import loss_denominator  # noqa: E402
from rlstream.trainer.optimize import make_optimizer, policy_update  # noqa: E402
from rlstream.trainer.precision import Precision  # noqa: E402
from rlstream.trainer.ranks import SINGLE, Ranks, close, init_ranks, shard, shares_of  # noqa: E402
from rlstream.trainer.streaming import StreamingStep  # noqa: E402

NOT_EQUAL_BY_DESIGN = {"train/micro_batches", "perf/padding_share"}
TIMEOUT_S = 300.0  # per collective: a loaded 2-core machine takes seconds, never minutes
CPU = torch.device("cpu")

# Every policy loss, every normalisation, the KL term (a sharded reference), TIS and IcePop, the
# rollout anchor, budgets that make several micro-batches per rank, several minibatches (down to one
# row each: a rank with none runs placeholders), streaming, LoRA. "budget" is micro_batch_tokens.
CASES: dict[str, dict] = {
    "grpo-token_mean-kl": dict(policy_loss="grpo", normalization="token_mean", kl_beta=0.05),
    "dapo-sequence_mean-kl-minibatches": dict(policy_loss="dapo", normalization="sequence_mean", kl_beta=0.05,
                                              ppo_n_minibatches=2),
    "is-token_sum-sequence_tis": dict(policy_loss="importance_sampling", normalization="token_sum",
                                      tis={"level": "sequence", "cap": 1.1}),
    "reinforce-token_mean-budget": dict(policy_loss="reinforce", budget=30),
    "dro-sequence_mean-budget-minibatches": dict(policy_loss="dro", normalization="sequence_mean", budget=30,
                                                 ppo_n_minibatches=3),
    "gspo-token_sum-kl-token_tis": dict(policy_loss="gspo", normalization="token_sum", kl_beta=0.1,
                                        tis={"level": "token", "cap": 1.2}),
    "cispo-icepop-rollout_anchor": dict(policy_loss="cispo", anchor_logp="rollout",
                                        tis={"level": "token", "icepop_threshold": 1.4}),
    "one_row_minibatches-budget": dict(ppo_n_minibatches=8, budget=12, kl_beta=0.05),
    "streaming-sequence_mean-kl": dict(streaming=True, normalization="sequence_mean", kl_beta=0.05, budget=30),
    "streaming-budget_1-token_sum": dict(streaming=True, normalization="token_sum", budget=1,
                                         policy_loss="gspo", chunks=((0,), (1,), (2,))),
    "lora-kl-budget-minibatches": dict(lora_rank=4, kl_beta=0.05, budget=30, ppo_n_minibatches=2),
    "lora-streaming-sequence_mean": dict(lora_rank=4, streaming=True, normalization="sequence_mean", budget=30),
}
CLIP = "grpo-clipped"  # grad_clip_norm below the norm: the global norm's coefficient on every shard
PER_RANK = "per_rank_normaliser"  # must NOT match: each rank divides by its own token count
NONFINITE = "nonfinite_on_one_rank"  # every rank skips the minibatch that one rank found non-finite
META = "built_from_rank0"  # rank 1 builds on the meta device, its shards filled from rank 0's weights
BF16 = "bfloat16-mixed_precision"  # runs; float32 masters and float32 gradients (no tolerance: bfloat16 rounds)


class PerRankNormaliser(Ranks):
    """What the step would be without the all-reduced normaliser: each rank's own count."""

    def denominator(self, mask_B_T, normalization):
        return loss_denominator(mask_B_T, normalization)


class ShardedRecorder:
    """``same_state.StepRecorder`` for a sharded model: every step's gradients, weights before and
    after, gathered whole (``full_tensor``, a collective every rank runs in its optimizer hooks);
    after each step the weights and AdamW state of ``follow``'s step, each rank its shard."""

    def __init__(self, model, optimizer, follow: StepRecorder):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer, self.follow, self.steps = optimizer, follow, []
        optimizer.register_step_pre_hook(self.pre)
        optimizer.register_step_post_hook(self.post)

    def pre(self, optimizer, args, kwargs) -> None:
        self.steps.append(Step([p.grad.full_tensor() for p in self.params],
                               [p.detach().full_tensor() for p in self.params], []))

    def post(self, optimizer, args, kwargs) -> None:
        from torch.distributed.tensor import distribute_tensor

        self.steps[-1].after = [p.detach().full_tensor() for p in self.params]
        theirs = self.follow.steps[len(self.steps) - 1]
        with torch.no_grad():
            for p, w, (m, v, t) in zip(self.params, theirs.after, theirs.state_after):
                state = optimizer.state[p]
                for mine, whole in ((p, w), (state["exp_avg"], m), (state["exp_avg_sq"], v)):
                    shard_ = distribute_tensor(whole, p.device_mesh, p.placements).to_local()
                    assert mine.to_local().shape == shard_.shape
                    mine.to_local().copy_(shard_)
                state["step"].copy_(t)


def build(over: dict, ranks: Ranks, budget: int | None, streaming: bool, compute: torch.dtype = torch.float32):
    """The case's config, model (sharded across ``ranks``), reference and optimizer."""
    cfg = legacy_config(prompt_groups_per_step=3, completions_per_prompt=4, learning_rate=1e-2,
                        trainer={"micro_batch_tokens": budget, "eps": 1e-3, "streaming": streaming},
                        **{"grad_clip_norm": None, **over})
    torch.manual_seed(0)
    model = build_model(0)
    if cfg.lora_rank:
        model = lora.wrap(model, cfg)
    ref = None
    if cfg.kl_beta > 0:
        ref = lora.AdapterDisabled(model) if cfg.lora_rank else copy.deepcopy(model).eval().requires_grad_(False)
        if not cfg.lora_rank:
            shard(ref, ranks, compute)
    shard(model, ranks, compute)
    return cfg, model, ref, make_optimizer(model, cfg)


def train(case: dict, batch, ranks: Ranks, *, budget: int | None, streaming: bool = False,
          follow: StepRecorder | None = None, magnitudes: bool = False):
    """One update of the case's fresh model on ``batch``: its metrics and its optimizer steps."""
    over = {k: v for k, v in case.items() if k not in ("budget", "streaming", "chunks")}
    cfg, model, ref, optimizer = build(over, ranks, budget, streaming)
    if ranks.distributed:
        recorder = ShardedRecorder(model, optimizer, follow)
    else:
        recorder = StepRecorder(model, optimizer, follow=follow, magnitudes=magnitudes)
    if not streaming:
        out = policy_update(model, optimizer, batch, cfg=cfg, lr=cfg.learning_rate, ref_model=ref, ranks=ranks)
        return out, recorder
    step = StreamingStep(model, optimizer, cfg=cfg, pad_id=0, device=CPU, precision=Precision(), ref_model=ref,
                         ranks=ranks)
    groups = groups_of(batch)
    for chunk in case.get("chunks", ((0,), (1, 2))):
        step.add([groups[i] for i in chunk])
    return step.finish(cfg.learning_rate), recorder


def the_batch():
    """mixed_batch's 12 rows through ``groups_of`` and ``collate`` (what the trainer trains on)."""
    groups = groups_of(mixed_batch(build_model(0), seed=0))
    return collate([s for g in groups for s in g.samples], torch.cat([g.advantages_G for g in groups]), 0, CPU)


def compare(case: dict, ranks: Ranks, report: list) -> None:
    """The case across ``ranks`` against one process, from the same state step by step."""
    batch, budget, streaming = the_batch(), case.get("budget"), case.get("streaming", False)
    whole_out, whole = train(case, batch, SINGLE, budget=budget)
    _, rows = train(case, batch, SINGLE, budget=1, follow=whole, magnitudes=True)
    out, sharded = train(case, batch, ranks, budget=budget, streaming=streaming, follow=whole)
    compare_steps(sharded, whole, rows, report)
    compare_metrics(out, whole_out, rows, slice(0, len(rows.steps)), report, ignore=NOT_EQUAL_BY_DESIGN,
                    normalization=case.get("normalization", legacy_config().normalization))


def compare_clipped(ranks: Ranks, report: list) -> None:
    """grad_clip_norm below the gradient's norm: the metrics (the global norm among them) as
    ``compare``; the clipped gradients within what the unclipped ones may differ by, times the
    coefficient, plus what the coefficient's own error (the norm's tolerance) moves them by."""
    case = dict(policy_loss="grpo", kl_beta=0.05, grad_clip_norm=0.05)
    batch = the_batch()
    whole_out, whole = train(case, batch, SINGLE, budget=None)
    _, rows = train(case, batch, SINGLE, budget=1, follow=whole, magnitudes=True)
    out, sharded = train(case, batch, ranks, budget=None, follow=whole)
    compare_metrics(out, whole_out, rows, slice(0, 1), report, ignore=NOT_EQUAL_BY_DESIGN)
    norm = whole_out["train/grad_norm"]
    assert norm > case["grad_clip_norm"], "the clip does not bind"
    coef = case["grad_clip_norm"] / norm
    tol = grad_tolerance(rows.steps[0])
    norm_tol = tol * sum(p.numel() for p in rows.params) ** 0.5 + 8 * U * norm
    for i, (a, b) in enumerate(zip(whole.steps[0].grads, sharded.steps[0].grads)):
        bound = coef * tol + a.abs() * 2 * norm_tol / norm + 4 * U * a.abs()
        assert bool(((b - a).abs() <= bound).all()), f"parameter {i}: clipped gradient off"
        report.append((f"clipped grad {i}", float(((b - a).abs() / bound).max())))


def per_rank_normaliser(ranks: Ranks) -> dict:
    """The step with each rank's own normaliser: it must differ from one process's (else the
    equality above would not show that the normaliser is summed), on ranks whose token counts differ."""
    batch = the_batch()
    lengths_B = batch.attention_B_N.sum(-1)
    tokens = [int(batch.mask_B_T[rows].sum()) for rows in shares_of(lengths_B, ranks.world)]
    wrong = PerRankNormaliser(ranks.rank, ranks.world, ranks.device, ranks.mesh)
    case = dict(policy_loss="grpo")
    whole_out, whole = train(case, batch, SINGLE, budget=None)
    _, rows = train(case, batch, SINGLE, budget=1, follow=whole, magnitudes=True)
    _, sharded = train(case, batch, wrong, budget=None, follow=whole)
    try:
        compare_steps(sharded, whole, rows)
    except AssertionError as exc:
        return {"ok": tokens[0] != tokens[1], "error": f"differs as it must: {exc}", "tokens": tokens}
    return {"ok": False, "error": "the per-rank normaliser gave the one-process step", "tokens": tokens}


def nonfinite(ranks: Ranks) -> dict:
    """A NaN behaviour logprob on an active token of one row, in rank 1's share of the second of
    two minibatches: that rank's loss is NaN, and every rank skips that step (and applies the other)."""
    batch = the_batch()
    second = torch.arange(len(batch.advantages_B)).tensor_split(2)[1]
    lengths_B = batch.attention_B_N.sum(-1)
    row = int(second[shares_of(lengths_B[second], ranks.world)[1][0]])
    batch.inf_logprobs_B_T[row, int(batch.mask_B_T[row].nonzero()[0])] = float("nan")
    case = dict(policy_loss="grpo", ppo_n_minibatches=2)
    whole_out, whole = train(case, batch, SINGLE, budget=None)
    out, sharded = train(case, batch, ranks, budget=None, follow=whole)
    ok = (whole_out["train/nonfinite_skipped"] == out["train/nonfinite_skipped"] == 1
          and len(whole.steps) == len(sharded.steps) == 1)
    return {"ok": ok, "error": f"one process {whole_out}, two ranks {out}"}


def bfloat16(ranks: Ranks) -> dict:
    """A step under FSDP's mixed precision (gathered in bfloat16, reduced in float32) with the
    trainer's autocast: it applies, its loss and norm are finite, masters and gradients float32."""
    cfg, model, ref, optimizer = build(dict(kl_beta=0.05), ranks, 30, False, torch.bfloat16)
    grads: list[torch.dtype] = []
    optimizer.register_step_pre_hook(lambda o, a, k: grads.extend(p.grad.dtype for p in model.parameters()))
    precision = Precision(torch.bfloat16, "cpu")
    out = policy_update(model, optimizer, the_batch(), cfg=cfg, lr=cfg.learning_rate, ref_model=ref,
                        precision=precision, ranks=ranks)
    finite = all(abs(out[k]) < float("inf") for k in ("train/loss", "train/grad_norm"))  # NaN fails it too
    ok = (out["train/nonfinite_skipped"] == 0 and finite and set(grads) == {torch.float32}
          and {p.dtype for p in model.parameters()} == {torch.float32})
    return {"ok": ok, "error": f"{out} gradient dtypes {set(grads)}"}


def built_from_rank0(ranks: Ranks, base: Path, lora_rank: int) -> dict:
    """``policy_model.load_base`` across the ranks (docs/design.md §15.94 Only rank 0 reads the
    weights; the others build the model on the meta device): rank 1 never calls ``from_pretrained``
    and holds only meta tensors until ``shard``; once sharded, the model's gathered state is rank 0's
    (the base's weights, LoRA's adapters as rank 0 initialised them) and every buffer, the rotary
    frequencies that no state dict holds included, is rank 0's on every rank."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rlstream.trainer.policy_model import load_base
    from rlstream.trainer.sharded import full_state_dict

    if ranks.rank == 0:
        save_tiny_model(base, seed=3)
    dist.barrier()
    read = AutoModelForCausalLM.from_pretrained
    if ranks.rank != 0:  # a read on this rank fails the case
        AutoModelForCausalLM.from_pretrained = classmethod(lambda cls, *a, **k: (_ for _ in ()).throw(
            AssertionError("rank 1 read the weights")))
    try:
        torch.manual_seed(5)  # LoRA's A: peft draws them on every rank; rank 0's are the ones broadcast
        model, _ = load_base(str(base), CPU, ranks)
    finally:
        AutoModelForCausalLM.from_pretrained = read
    if lora_rank:
        model = lora.wrap(model, legacy_config(lora_rank=lora_rank))
    meta = all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    expected = {k: v.clone() for k, v in model.state_dict().items()} if ranks.rank == 0 else None
    shard(model, ranks)
    gathered = full_state_dict(model)
    same = True if ranks.rank != 0 else (gathered.keys() == expected.keys()
                                         and all(torch.equal(gathered[k], expected[k]) for k in expected))
    buffers = torch.cat([b.flatten().float() for b in model.buffers()])
    every = [torch.empty_like(buffers) for _ in range(ranks.world)]
    dist.all_gather(every, buffers)
    checks = {"rank 1 built on meta": bool(ranks.all_agree(meta if ranks.rank else True)),
              "gathered state is rank 0's": bool(ranks.all_agree(same)),
              "buffers equal on every rank": all(torch.equal(every[0], b) for b in every),
              "buffers are finite": bool(torch.isfinite(buffers).all())}
    return {"ok": all(checks.values()), "error": str(checks)}


def main(path: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    ranks = init_ranks(CPU, TIMEOUT_S)
    assert ranks.world == 2, ranks
    results = {}
    for name, case in [*CASES.items(), (CLIP, None)]:
        report: list[tuple[str, float]] = []
        try:
            compare(case, ranks, report) if case is not None else compare_clipped(ranks, report)
            results[name] = {"ok": True, "worst": max(report, key=lambda x: x[1])}
        except AssertionError:
            results[name] = {"ok": False, "error": traceback.format_exc()[-3000:]}
    results[PER_RANK] = per_rank_normaliser(ranks)
    results[BF16] = bfloat16(ranks)
    results[NONFINITE] = nonfinite(ranks)
    for lora_rank in (0, 4):
        results[f"{META}-lora{lora_rank}"] = built_from_rank0(ranks, Path(path).parent / f"base-{lora_rank}", lora_rank)
    if ranks.rank == 0:
        Path(path).write_text(json.dumps(results, indent=1))
    close(ranks)


if __name__ == "__main__":
    main(sys.argv[1])
    end_rank(0)  # not through the interpreter's finalization, where gloo's threads abort it (its docstring)
