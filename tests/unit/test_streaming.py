"""Streaming accumulation is the whole-batch step (docs/design.md §15.70 Streaming accumulation
divides last): groups added in chunks as they "arrive", then one step, give the losses,
gradient norms, metrics and weights of ``policy_update`` on the whole batch, for every loss and
normalisation, with the KL term and TIS at both levels, to float32 rounding."""
from __future__ import annotations

import copy

import pytest
import torch
from factories import legacy_config
from same_state import StepRecorder, compare_metrics, compare_steps
from test_microbatch import mixed_batch

from rlstream.builtin.tiny_model import build_model
from rlstream.core.config import NORMALIZATIONS, POLICY_LOSSES
from rlstream.core.errors import ConfigError
from rlstream.core.messages import RolloutRecord, group_id_for, sample_id_for
from rlstream.trainer.batch import Batch, Group, collate, token_advantages_of
from rlstream.trainer.optimize import make_optimizer, policy_update
from rlstream.trainer.precision import Precision
from rlstream.trainer.streaming import StreamingStep

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/unit/conftest.py
G = 4  # mixed_batch's 12 rows: 3 groups of 4
NOT_EQUAL_BY_DESIGN = {"train/micro_batches", "perf/padding_share"}


def groups_of(batch: Batch) -> list[Group]:
    """The batch's rows as three scored groups of RolloutRecords (what the buffer hands over)."""
    groups = []
    for g in range(len(batch.advantages_B) // G):
        gid = group_id_for(0, g, 0)
        group = Group(gid, G, advantages_G=batch.advantages_B[g * G:(g + 1) * G])
        for m in range(G):
            i, n = g * G + m, int(batch.attention_B_N[g * G + m].sum())
            group.members[str(m)] = (f"1-{i}", RolloutRecord(
                tokens=batch.tokens_B_N[i, :n].tolist(), logprobs=[0.0] + batch.inf_logprobs_B_T[i, :n - 1].tolist(),
                loss_mask=[0] + [int(v) for v in batch.mask_B_T[i, :n - 1].tolist()], reward=0.0,
                sample_id=sample_id_for(gid, m), group_id=gid, group_size=G, row_index=g))
        groups.append(group)
    return groups


def run(how: str, chunks=((0,), (1, 2)), steps: int = 2, budget: int = 30, follow: StepRecorder | None = None,
        **overrides) -> tuple[list[dict[str, float]], StepRecorder]:
    """``steps`` updates of a fresh tiny model: ``how`` = "whole" (``policy_update`` on the whole
    batch), "streamed" (in ``chunks`` of groups), or "rows" (one row per backward, recording the
    gradients' magnitudes); after every step the weights and AdamW state of ``follow``'s run."""
    streamed = how == "streamed"
    per_token = overrides.pop("per_token", False)
    # No clipping: the gradients are compared as accumulated, which is what the derivation in
    # tests/unit/same_state.py bounds (a clip rescales both sides after it, by a coefficient with
    # its own rounding; tests/unit/test_optimize.py covers the clip).
    cfg = legacy_config(prompt_groups_per_step=3, completions_per_prompt=G, learning_rate=1e-2,
                        trainer={"micro_batch_tokens": 1 if how == "rows" else budget, "eps": 1e-3,
                                 "streaming": streamed},
                        **{"grad_clip_norm": None, **overrides})
    torch.manual_seed(0)
    model = build_model(0)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_beta > 0 else None
    optimizer = make_optimizer(model, cfg)
    recorder = StepRecorder(model, optimizer, follow=follow, magnitudes=how == "rows")
    out = []
    for s in range(steps):
        groups = groups_of(mixed_batch(model, seed=s))
        if per_token:  # IGPO's shape: one advantage per target (docs/design.md §15.84 Per-token advantages: a
            # turn's tokens carry its advantage); the middle group keeps its scalar advantages
            gen = torch.Generator().manual_seed(s)
            for g in (groups[0], groups[2]):
                g.token_advantages = [torch.randn(len(x.tokens) - 1, generator=gen) for x in g.samples]
        if not streamed:
            samples = [x for g in groups for x in g.samples]
            batch = collate(samples, torch.cat([g.advantages_G for g in groups]), 0, torch.device("cpu"),
                            token_advantages_of(groups))
            out.append(policy_update(model, optimizer, batch, cfg=cfg, lr=cfg.learning_rate, ref_model=ref))
            continue
        step = StreamingStep(model, optimizer, cfg=cfg, pad_id=0, device=torch.device("cpu"), precision=Precision(),
                             ref_model=ref)
        for chunk in chunks:
            step.add([groups[i] for i in chunk])
        out.append(step.finish(cfg.learning_rate))
        out[-1]["streamed"] = step.streamed_samples
    return out, recorder


def assert_same_step(**overrides) -> list[dict[str, float]]:
    """Each step streamed is the whole-batch step from the same state (tests/unit/same_state.py):
    its gradients before AdamW, its weights after, its metrics."""
    whole, whole_steps = run("whole", **overrides)
    streamed, streamed_steps = run("streamed", follow=whole_steps, **overrides)
    _, rows = run("rows", follow=whole_steps, **overrides)
    report: list[tuple[str, float]] = []
    compare_steps(streamed_steps, whole_steps, rows, report)
    normalization = overrides.get("normalization", legacy_config().normalization)
    for k, (w, s) in enumerate(zip(whole, streamed)):
        compare_metrics({key: v for key, v in s.items() if key != "streamed"}, w, rows, slice(k, k + 1), report,
                        ignore=NOT_EQUAL_BY_DESIGN, normalization=normalization)
    print("largest error / tolerance:", max(report, key=lambda x: x[1]))
    return streamed


@pytest.mark.numeric
@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("loss", POLICY_LOSSES)
def test_every_loss_and_normalization_with_kl(loss, normalization):
    out = assert_same_step(policy_loss=loss, normalization=normalization, kl_beta=0.05)
    assert 0 < out[0]["streamed"] < 3 * G  # some of the batch ran before it was complete, not all of it


@pytest.mark.numeric
@pytest.mark.parametrize("tis", [{"level": "token", "cap": 1.2}, {"level": "sequence", "cap": 1.1},
                                 {"level": "sequence", "icepop_threshold": 1.4}], ids=["token", "sequence", "icepop"])
def test_tis_and_the_rollout_anchor(tis):
    assert_same_step(tis=tis, anchor_logp="rollout", normalization="sequence_mean")


@pytest.mark.numeric
@pytest.mark.parametrize("chunks", [((0,), (1,), (2,)), ((0, 1, 2),), ((2,), (0, 1))])
def test_any_arrival_pattern_and_budget(chunks):
    assert_same_step(chunks=chunks, budget=1)  # budget 1: every row its own micro-batch
    assert_same_step(chunks=chunks, budget=200, kl_beta=0.1)


@pytest.mark.numeric
@pytest.mark.parametrize("loss", ["grpo", "gspo"])
def test_per_token_advantages(loss):
    """A batch whose groups carry per-token advantages (beside one with scalars) streams to the
    whole-batch step too, micro-batch budget and arrival pattern whatever they are."""
    assert_same_step(per_token=True, policy_loss=loss)
    assert_same_step(per_token=True, policy_loss=loss, chunks=((2,), (0, 1)), budget=1, kl_beta=0.05)


@pytest.mark.parametrize("how", ["nan advantages", "nan loss, finite gradient"])
def test_a_nonfinite_chunk_skips_the_step(how, monkeypatch):
    cfg = legacy_config(prompt_groups_per_step=3, completions_per_prompt=G, trainer={"micro_batch_tokens": 30,
                                                                              "streaming": True})
    torch.manual_seed(0)
    model = build_model(0)
    before = [p.detach().clone() for p in model.parameters()]
    groups = groups_of(mixed_batch(model))
    if how == "nan advantages":
        groups[1].advantages_G = torch.full((G,), float("nan"))
    else:  # only the loss's value read back decides: the gradient norm would let the step through
        from rlstream.trainer import optimize

        real = optimize.compute_loss

        def nan_loss(*args, **kwargs):
            loss, metrics = real(*args, **kwargs)
            return loss + float("nan"), metrics | {"mean_loss": float("nan")}

        monkeypatch.setattr(optimize, "compute_loss", nan_loss)
    step = StreamingStep(model, make_optimizer(model, cfg), cfg=cfg, pad_id=0, device=torch.device("cpu"),
                         precision=Precision())
    step.add(groups[:2])
    out = step.finish(1e-3)
    assert out["train/nonfinite_skipped"] == 1
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("trainer", "extra", "needed"), [
    ({"streaming": True}, {}, "set micro_batch_tokens"),
    ({"streaming": True, "micro_batch_tokens": 64}, {"ppo_n_minibatches": 2}, "ppo_n_minibatches = 1"),
])
def test_streaming_config_says_what_it_needs(trainer, extra, needed):
    from rlstream.core.config import validate_config

    with pytest.raises(ConfigError, match=needed):
        validate_config({"trainer": trainer, **extra})


def test_the_trainer_streams_groups_as_they_arrive_and_holds_them_until_the_commit(r, tmp_path):
    """Through the trainer's own buffer on fakeredis: the first group runs before the second
    arrives (a full micro-batch runs at once; a partly filled one waits, see the loss tests); a
    rescan of the pending list meanwhile (a connection error was retried) must not take the
    first group's pending entries for strays and ack them (they would be lost in a crash
    before the commit); the step commits both groups."""
    from test_staleness import RUN, add_group, config, last_commit

    from rlstream.core import bus, keys
    from rlstream.trainer.trainer import Trainer

    bus.ensure_group(r, keys.rollouts(RUN))
    cfg = config(tmp_path, prompt_groups_per_step=2, trainer={"micro_batch_tokens": 6, "streaming": True})
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    first = add_group(r, 0, sampled=0)  # two rows of 3 tokens: one full micro-batch of 6
    step = StreamingStep(t.model, t.optimizer, cfg=cfg, pad_id=t.pad_id, device=t.device, precision=t.precision)
    arrivals: list[int] = []

    def chunk(groups):
        step.add(groups)
        arrivals.append(step.streamed_samples)
        if len(arrivals) == 1:
            t.buffer.errors_seen = -1  # as after a retried connection error: the next read rescans
            add_group(r, 1, sampled=0)

    groups = t.buffer.stream(2, t.version, chunk)
    assert arrivals == [2, 4]  # each group's micro-batch (full: 2 rows x 3 tokens) ran as it arrived
    assert [g.group_id for g in groups][0] == first and len(groups) == 2
    assert bus.group_info(r, keys.rollouts(RUN))["pending"] == 4  # nothing acked before the commit
    m = t.train_step(groups, wait_time=0.0, streamed=step)
    assert m["perf/streamed_share"] == 1.0 and m["train/micro_batches"] == 2
    assert sorted(last_commit(r).group_ids) == sorted(g.group_id for g in groups)
    assert bus.group_info(r, keys.rollouts(RUN))["pending"] == 0


def test_a_trainer_that_dies_mid_batch_commits_nothing_and_its_successor_trains_the_batch(r, tmp_path):
    """A crash with a batch half accumulated: the gradients die with the process, nothing was
    acked or committed, and the next trainer (after the lease lapses) retrains those samples."""
    from test_staleness import RUN, add_group, config, last_commit

    from rlstream.core import bus, keys
    from rlstream.trainer.trainer import Trainer

    class Killed(Exception):
        pass

    bus.ensure_group(r, keys.rollouts(RUN))
    cfg = config(tmp_path, prompt_groups_per_step=2, trainer={"micro_batch_tokens": 6, "streaming": True})
    first = Trainer(cfg, r, cfg.run_dir())
    first.resume()
    add_group(r, 0, sampled=0)
    step = StreamingStep(first.model, first.optimizer, cfg=cfg, pad_id=first.pad_id, device=first.device,
                         precision=first.precision)

    def die_after_the_forward(groups):
        step.add(groups)
        raise Killed

    with pytest.raises(Killed):
        first.buffer.stream(2, first.version, die_after_the_forward)
    assert step.streamed_samples == 2  # its forward/backward had run
    assert bus.group_info(r, keys.rollouts(RUN))["pending"] == 2 and first.state.steps == 0
    first.lease.release()  # as when the dead trainer's lease expires

    second = Trainer(cfg, r, cfg.run_dir())
    second.resume()
    add_group(r, 1, sampled=0)
    groups, streamed = second.gather(2)
    m = second.train_step(groups, wait_time=0.0, streamed=streamed)
    assert m["step"] == 1 and len(last_commit(r).group_ids) == 2
    assert bus.group_info(r, keys.rollouts(RUN))["pending"] == 0
