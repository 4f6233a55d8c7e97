"""The perf/* and rollout/* metric families (docs/operations.md "Perf and rollout metrics"): the pure
arithmetic (overlap, rates, the rollout quality figures), the trainer's stopwatch, and a live
trainer step on fakeredis writing every cookbook key to metrics.jsonl."""
from __future__ import annotations

import math

import factories
import pytest
from factories import legacy_config

from rlstream.core import bus, keys
from rlstream.core.messages import GroupAdmitted, GroupSampled, RolloutRecord, group_id_for
from rlstream.core.metrics import read_metrics
from rlstream.core.run_state import RunState
from rlstream.trainer.batch import Group
from rlstream.trainer.perf_metrics import PerfClock, overlap_ratio, sampling_windows
from rlstream.trainer.step_metrics import rollout_quality

COOKBOOK = {"perf/trainer_wait_for_sampler_time", "perf/sampler_wait_for_trainer_time", "perf/overlap_ratio",
            "perf/step_time", "perf/train_time", "perf/train_wait_time", "perf/wait_time_ratio",
            "perf/weight_update_time", "perf/step_samples_per_s", "perf/step_tokens_per_s",
            "perf/fwd_bwd_time", "perf/optim_step_time", "perf/rollout_samples_per_s", "perf/rollout_tokens_per_s",
            "rollout/raw_reward", "rollout/filtered_reward", "rollout/raw_samples", "rollout/filtered_samples",
            "rollout/filter_ratio", "train/inference_k1", "train/inference_k3",
            "rollout/accuracy", "rollout/truncated_ratio", "rollout/response_len/mean",
            "rollout/response_len/max", "rollout/response_len/min", "rollout/entropy",
            "async/stale_groups_dropped", "async/stale_groups_dropped_total"}
ALIASES = {"perf/step_wall_time", "perf/weight_sync_time"}  # the old names, kept for a release


def sample(mask: list[int], logprobs: list[float], reward: float = 1.0, finish: str = "stop", window=(0.0, 0.0),
           **metrics: float) -> RolloutRecord:
    return RolloutRecord(tokens=range(1, len(mask) + 1), logprobs=logprobs, loss_mask=mask, reward=reward,
                         finish_reason=finish, metrics=metrics, started_at=window[0], finished_at=window[1])


def test_rollout_quality_of_a_batch():
    batch = [sample([0, 1, 1], [0.0, -1.0, -2.0], reward=1.0),
             sample([0, 0, 1, 1, 1, 1], [0.0, 0.0, -0.5, -0.5, -0.5, -0.5], reward=0.0, finish="length"),
             sample([0, 1], [0.0, -3.0], reward=-1.0)]
    q = rollout_quality(batch)
    assert q["rollout/accuracy"] == pytest.approx(1 / 3)  # reward > 0
    assert q["rollout/truncated_ratio"] == pytest.approx(1 / 3)
    assert (q["rollout/response_len/min"], q["rollout/response_len/max"]) == (1, 4)
    assert q["rollout/response_len/mean"] == pytest.approx(7 / 3)
    assert q["rollout/entropy"] == pytest.approx((1 + 2 + 4 * 0.5 + 3) / 7)  # -mean logprob of generated tokens


def test_accuracy_is_the_rollouts_own_metric_when_every_sample_reports_one():
    batch = [sample([0, 1], [0.0, -1.0], reward=0.2, accuracy=1.0),
             sample([0, 1], [0.0, -1.0], reward=0.9, accuracy=0.0)]
    assert rollout_quality(batch)["rollout/accuracy"] == 0.5


def test_overlap_is_the_share_of_sampling_time_under_trainer_busy_time():
    busy = [(10.0, 20.0), (30.0, 40.0)]
    assert overlap_ratio([(12.0, 18.0, 4)], busy) == 1.0
    assert overlap_ratio([(20.0, 30.0, 4)], busy) == 0.0
    assert overlap_ratio([(15.0, 35.0, 1)], busy) == pytest.approx(0.5)
    # weighted by samples: 4 samples fully hidden, 4 not at all
    assert overlap_ratio([(12.0, 14.0, 4), (22.0, 24.0, 4)], busy) == pytest.approx(0.5)
    assert overlap_ratio([], busy) is None
    assert overlap_ratio([(5.0, 5.0, 2)], busy) == 0.0


def test_overlap_reads_only_the_busy_intervals_near_the_batch_and_gives_the_same_ratio():
    import random

    rng = random.Random(0)
    busy = [(float(i), i + rng.uniform(0.1, 0.9)) for i in range(256)]  # the deque after 256 steps
    windows = [(a, a + rng.uniform(0.0, 3.0), rng.randint(1, 8)) for a in (rng.uniform(240, 255) for _ in range(32))]
    total = sum((b - a) * n for a, b, n in windows)
    every = sum(n * sum(max(0.0, min(b, be) - max(a, bs)) for bs, be in busy) for a, b, n in windows)
    assert overlap_ratio(windows, busy) == min(1.0, every / total)  # exactly: the others add 0.0
    assert overlap_ratio(windows, [(0.0, 1.0)] * 200 + busy) == overlap_ratio(windows, busy)


def test_sampling_windows_skip_untimed_samples_and_count_members():
    timed = [sample([0, 1], [0.0, -1.0], window=(1.0, 2.0)) for _ in range(3)]
    assert sampling_windows([*timed, sample([0, 1], [0.0, -1.0])]) == [(1.0, 2.0, 3)]


def test_perf_clock_rates_waits_and_weight_time(monkeypatch):
    clock = {"mono": 100.0, "wall": 1000.0}
    monkeypatch.setattr("rlstream.trainer.perf_metrics.time.monotonic", lambda: clock["mono"])
    monkeypatch.setattr("rlstream.trainer.perf_metrics.time.time", lambda: clock["wall"])
    state = RunState()
    perf = PerfClock()
    perf.restart(state, {keys.GATE_CLOSED_MS: 500})
    for row in range(2):  # 2 groups of 4 samples, 12 generated tokens each, written by workers
        state.apply(GroupSampled(group_id=f"g{row}", samples=4, tokens=12))
    state.apply(GroupSampled(group_id="g1", samples=4, tokens=12))  # a re-delivered event counts once
    perf.weights_written(0.75)
    perf.weights_sealed(0.5)  # the previous version's directory, written beside this step
    clock["mono"], clock["wall"] = 104.0, 1004.0  # 4 s later; the trainer waited 3 s of them (1001-1004)
    g = Group("g0", 2)
    for m in range(2):  # sampled 1000.0-1002.0: 1 s of it while the trainer was busy (1000-1001)
        g.members[f"s{m}"] = ("1-0", sample([0, 1], [0.0, -1.0], window=(1000.0, 1002.0)))
    line = perf.line([g], wait_time=3.0, compute_began=1004.0, state=state, stats={keys.GATE_CLOSED_MS: 2500})
    assert line["perf/step_time"] == 4.0
    assert line["perf/trainer_wait_for_sampler_time"] == 3.0
    assert line["perf/sampler_wait_for_trainer_time"] == 2.0
    assert line["perf/weight_update_time"] == 0.75 and line["perf/weight_write_time"] == 0.5
    assert line["perf/rollout_samples_per_s"] == 2.0 and line["perf/rollout_tokens_per_s"] == 6.0
    assert line["perf/overlap_ratio"] == pytest.approx(0.5)
    clock["mono"] = 106.0
    line = perf.line([g], wait_time=1.0, compute_began=1006.0, state=state, stats={keys.GATE_CLOSED_MS: 2500})
    assert (line["perf/weight_update_time"], line["perf/weight_write_time"], line["perf/rollout_samples_per_s"]) \
        == (0.0, 0.0, 0.0)  # reset per step
    assert line["perf/step_time"] == 2.0 and line["perf/sampler_wait_for_trainer_time"] == 0.0


def test_a_live_trainer_step_logs_every_cookbook_metric(r, tmp_path):
    from rlstream.trainer.trainer import Trainer

    run = "perf"
    bus.ensure_group(r, keys.rollouts(run))
    cfg = legacy_config(run_id=run, log_path=str(tmp_path), max_steps=1, prompt_groups_per_step=1,
                        completions_per_prompt=2, dcp_save_interval=0)
    gid = group_id_for(0, 0, 0)
    bus.xadd(r, keys.events(run), GroupAdmitted(group_id=gid, row_index=0, epoch=0, attempt=0, submit_version=0,
                                                group_size=2))
    bus.xadd(r, keys.events(run), GroupSampled(group_id=gid, samples=2, tokens=4, worker_id="w"))
    for m in range(2):
        bus.xadd(r, keys.rollouts(run), factories.sample(0, m, started_at=1.0, finished_at=2.0))
    t = Trainer(cfg, r, tmp_path / run)
    assert t.run() == 1
    line = read_metrics(tmp_path / run / "metrics.jsonl")[-1]
    assert COOKBOOK | ALIASES <= set(line), (COOKBOOK | ALIASES) - set(line)
    assert all(isinstance(line[k], (int, float)) and math.isfinite(line[k]) for k in COOKBOOK)
    assert line["perf/weight_update_time"] > 0  # weight_sync_interval 1: this step wrote its weights
    assert line["perf/step_wall_time"] == line["perf/step_time"] >= line["perf/train_time"] > 0
    assert line["perf/fwd_bwd_time"] > 0 and "perf/ref_forward_time" not in line  # kl_beta 0: no reference
    assert "train/mean_kl" not in line and line["train/inference_k3"] >= 0  # mean_kl: KL to a reference only
    assert line["perf/overlap_ratio"] == 0.0  # sampled long before the trainer started
    assert line["rollout/accuracy"] == 0.5 and line["rollout/entropy"] == 1.0


def test_the_producer_counts_the_time_its_gate_holds_rows_back(r, monkeypatch, tmp_path):
    from rlstream.producers.producer import count_gate_wait

    now = {"t": 50.0}
    monkeypatch.setattr("rlstream.producers.producer.time.monotonic", lambda: now["t"])
    cfg = legacy_config(run_id="gate", log_path=str(tmp_path), prompt_groups_per_step=1, completions_per_prompt=2)
    state = RunState()
    stats = keys.rollout_stats("gate")
    assert count_gate_wait(r, cfg, state, None, rows_left=True) is None  # nothing admitted: open
    for row in range(cfg.offpolicy_versions + 1):  # (v + O + 1) * B samples reserved: closed
        state.apply(GroupAdmitted(group_id=group_id_for(0, row, 0), row_index=row, epoch=0, attempt=0,
                                  submit_version=0, group_size=2))
    since = count_gate_wait(r, cfg, state, None, rows_left=True)
    assert since == 50.0 and r.hget(stats, keys.GATE_CLOSED_MS) is None
    now["t"] = 51.5
    since = count_gate_wait(r, cfg, state, since, rows_left=True)
    assert since == 51.5 and int(r.hget(stats, keys.GATE_CLOSED_MS)) == 1500
    now["t"] = 52.0
    assert count_gate_wait(r, cfg, state, since, rows_left=False) is None  # no rows left: nothing held back
    assert int(r.hget(stats, keys.GATE_CLOSED_MS)) == 2000


def test_gate_time_counted_in_many_short_passes_loses_no_fraction(r, monkeypatch, tmp_path):
    from rlstream.producers.producer import count_gate_wait

    now = {"t": 10.0}
    monkeypatch.setattr("rlstream.producers.producer.time.monotonic", lambda: now["t"])
    cfg = legacy_config(run_id="gate2", log_path=str(tmp_path), prompt_groups_per_step=1, completions_per_prompt=2)
    state = RunState()
    for row in range(cfg.offpolicy_versions + 1):
        state.apply(GroupAdmitted(group_id=group_id_for(0, row, 0), row_index=row, epoch=0, attempt=0,
                                  submit_version=0, group_size=2))
    since = count_gate_wait(r, cfg, state, None, rows_left=True)
    for _ in range(1000):  # 1000 passes of 0.7 ms each: 700 ms, though no pass reaches 1 ms
        now["t"] += 0.0007
        since = count_gate_wait(r, cfg, state, since, rows_left=True)
    assert int(r.hget(keys.rollout_stats("gate2"), keys.GATE_CLOSED_MS)) in (699, 700)
