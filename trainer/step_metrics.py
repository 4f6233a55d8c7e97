"""What the trainer logs: the metrics line of a training step (``metrics.jsonl``, the
``StepCommitted`` event, wandb) and of an evaluation, as pure functions of what the step
saw. The trainer and ``rlstream replay`` build their lines here, so both log the same keys
for the same things.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import compress

from rlstream.core import keys
from rlstream.core.run_state import RunState
from rlstream.trainer.batch import Group
from rlstream.trainer.staleness import STALE_PREFIX

FILTER_REASON = "dynamic_filter_fn"  # the GroupRejected reason of a dynamic_filter_fn rejection


@dataclass(frozen=True)
class LiveRun:
    """What only a live run knows about a step (a replay of recorded steps has none of it)."""

    wait_time: float  # seconds the trainer waited for the batch's groups
    rejected_groups: int  # rejected_total(state)
    worker_counts: dict[str, int]  # bus.rollout_stats (keys.WORKER_STATS among them)
    filter_kept: int  # dynamic_filter_fn decisions since the last step
    filter_rejected: int
    filter_rejected_samples: int = 0  # ... the samples of the groups it rejected, and their rewards' sum
    filter_rejected_reward: float = 0.0
    stale_dropped: int = 0  # groups dropped past the staleness bound while this batch was gathered
    stale_dropped_total: int = 0  # ... over the whole run
    perf: dict[str, float] = field(default_factory=dict)  # perf_metrics.PerfClock.line


def rejected_total(state: RunState) -> int:
    """Groups rejected and never trained, by anyone (incomplete, non-finite advantage, failed
    rollout job); dynamic_filter_fn rejections have their own ratio."""
    return sum(1 for gid, reason in state.rejected.items() if reason != FILTER_REASON and gid not in state.trained)


class RejectionTally:
    """``rejected_total`` and ``stale_total`` of a fold that keeps growing, each call reading only
    what is new: the rejections and the trained groups since the last call (``state.rejected_order``,
    ``state.trained_order``, both append-only). A new rejection is classified once; a group counted as
    never trained leaves the count when it is trained after all. Recounting every rejection of the run
    at every step cost O(run length) a step: 12 ms with 160,000 rejections."""

    def __init__(self, state: RunState):
        self.state, self.rejected_seen, self.trained_seen, self.stale = state, 0, 0, 0
        self.untrained: set[str] = set()  # rejected (not by dynamic_filter_fn), not trained so far

    def totals(self) -> tuple[int, int]:
        """(``rejected_total(state)``, ``stale_total(state)``) now."""
        state = self.state
        for gid in state.rejected_order[self.rejected_seen:]:
            reason = state.rejected[gid]
            self.stale += reason.startswith(STALE_PREFIX)
            if reason != FILTER_REASON and gid not in state.trained:
                self.untrained.add(gid)
        for gid in state.trained_order[self.trained_seen:]:
            self.untrained.discard(gid)
        self.rejected_seen, self.trained_seen = len(state.rejected_order), len(state.trained_order)
        return len(self.untrained), self.stale


def step_metrics(step: int, version: int, groups: list[Group], train_metrics: dict[str, float], *,
                 train_time: float, live: LiveRun | None = None) -> dict[str, float]:
    """The line of one step: the batch's rollouts, ``train_metrics`` (``policy_update``'s),
    the step's timing (``train_time``: its own work) and, for a live run, the stream around
    the batch. ``version`` is the one the step produced, so ``version - 1`` is the policy it
    trained; the async offsets count how many versions behind it each sample was generated
    (``min_version``) or admitted. Names follow the cookbook's (docs/operations.md, "Perf and
    rollout metrics"), with the old ones kept beside them for a release (``ALIASES``)."""
    samples = [s for g in groups for s in g.samples]
    reward = sum(s.reward for s in samples)
    raw_samples = len(samples) + (live.filter_rejected_samples if live else 0)
    metrics = {
        "step": step, "version": version,
        "rollout/reward_mean": reward / len(samples), "rollout/samples": len(samples),
        "rollout/groups": len(groups), **rollout_quality(samples),
        # The cookbook's filter family: before dynamic_filter_fn (this batch and the groups it rejected since
        # the last step) and after it (this batch).
        "rollout/raw_reward": (reward + (live.filter_rejected_reward if live else 0.0)) / raw_samples,
        "rollout/filtered_reward": reward / len(samples),
        "rollout/raw_samples": raw_samples, "rollout/filtered_samples": len(samples),
        "rollout/filter_ratio": 1.0 - len(samples) / raw_samples,
    }
    if live is not None:
        sampled_at = [s.min_version for s in samples]  # ints: Python sums them exactly, no tensor needed
        decided = live.filter_kept + live.filter_rejected
        metrics.update({
            "rollout/rejected_groups_total": live.rejected_groups,
            "rollout/invalid_samples_total": live.worker_counts.get(keys.INVALID_SAMPLES, 0),
            "rollout/failures_total": live.worker_counts.get(keys.ROLLOUT_FAILURES, 0),
            "async/version_offset_max": float(version - 1 - min(sampled_at)),
            "async/version_offset_mean": version - 1 - sum(sampled_at) / len(sampled_at),
            "async/submit_offset_max": max(version - 1 - s.submit_version for s in samples),
            "rollout/filter_reject_ratio": live.filter_rejected / decided if decided else 0.0,
            "async/stale_groups_dropped": live.stale_dropped,
            "async/stale_groups_dropped_total": live.stale_dropped_total,
        })
    metrics.update(train_metrics)
    metrics["perf/train_time"] = train_time
    if live is not None:
        metrics.update(live.perf)  # perf/step_time among them: the wall time since the previous step's line
    step_time = metrics.setdefault("perf/step_time", train_time)  # a replayed step waits for nothing
    metrics["perf/train_wait_time"] = max(step_time - train_time, 0.0)
    metrics["perf/wait_time_ratio"] = metrics["perf/train_wait_time"] / step_time if step_time > 0 else 0.0
    metrics["perf/step_samples_per_s"] = len(samples) / step_time if step_time > 0 else 0.0
    metrics["perf/step_tokens_per_s"] = sum(s.loss_mask.count(1) for s in samples) / step_time \
        if step_time > 0 else 0.0
    for old, new in ALIASES.items():
        if new in metrics:
            metrics[old] = metrics[new]
    return metrics


# Names this line had before the cookbook's, kept for a release (docs/changelog.md 0.2.0): old -> new.
# Two old names changed meaning and cannot be kept: perf/step_time was the step's own work (now
# perf/train_time) and perf/train_wait_time the wait for the batch (perf/trainer_wait_for_sampler_time).
ALIASES = {"perf/step_wall_time": "perf/step_time", "perf/weight_sync_time": "perf/weight_update_time"}


def rollout_quality(samples: list) -> dict[str, float]:
    """The batch's rollout/* family (docs/operations.md "Perf and rollout metrics"): accuracy (the mean of the
    rollouts' own ``accuracy`` metric where every sample reports one, else the share with reward
    > 0), truncation (finish_reason "length"), response length in generated (loss_mask 1) tokens,
    and the entropy estimate -mean(behaviour logprob) over generated tokens."""
    lengths = [s.loss_mask.count(1) for s in samples]
    if all("accuracy" in s.metrics for s in samples):
        accuracy = sum(s.metrics["accuracy"] for s in samples) / len(samples)
    else:
        accuracy = sum(s.reward > 0 for s in samples) / len(samples)
    logprob_sum = sum(sum(compress(s.logprobs, s.loss_mask)) for s in samples)  # C loops: 1k tokens ~10 us
    return {
        "rollout/accuracy": accuracy,
        "rollout/truncated_ratio": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "rollout/response_len/mean": sum(lengths) / len(lengths),
        "rollout/response_len/max": max(lengths), "rollout/response_len/min": min(lengths),
        "rollout/entropy": -logprob_sum / max(sum(lengths), 1),
    }


def eval_metrics(step: int, version: int, metrics: dict[str, float]) -> dict[str, float]:
    """The line of an evaluation: ``eval/version`` marks it (``read_metrics(evaluations=True)``)."""
    return {"step": step, "version": version, "eval/version": version, **metrics}
