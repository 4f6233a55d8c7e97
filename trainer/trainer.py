"""The trainer: read, gate, group, loss, step, publish, commit, log.

``train_step`` is the algorithm on one screen; ``collect_groups`` reads the durable buffer
(the consumer group's pending-entries list); ``trainer.resume`` rebuilds the exact state of
a crashed trainer, so no sample is lost or trained twice and step numbers continue without
gap; ``run`` loops until the run ends.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import redis
import torch

from rlstream.core import bus, keys
from rlstream.core.config import Config
from rlstream.core.credentials import private_dir
from rlstream.core.messages import DeadLetter, Evaluated, RolloutSample, RunFinished, StepCommitted
from rlstream.core.metrics import MetricsLog
from rlstream.core.run_state import RunState
from rlstream.sampling.torch_setup import load_model_and_tokenizer, setup_torch
from rlstream.trainer import buffer
from rlstream.trainer.advantages import resolve_advantage
from rlstream.trainer.batch import Group, GroupAssembler, collate, take_oldest
from rlstream.trainer.checkpoint import (
    CheckpointState,
    checkpoint_dir,
    export_model,
    holds_commit,
    load_checkpoint,
    rng_untouched,
    save_checkpoint,
    verify_checkpoint,
)
from rlstream.trainer.commit import ack_untrained, commit_step, publish, reject_group
from rlstream.trainer.hooks import EvaluationContext, load_evaluation, load_filter, run_evaluation
from rlstream.trainer.optimize import make_optimizer, policy_update
from rlstream.trainer.policy_model import base_model_path, load_reference, publish_weights
from rlstream.trainer.resume import resume
from rlstream.trainer.schedule import lr_multiplier
from rlstream.trainer.wandb_log import make_logger

log = logging.getLogger(__name__)
CONSUMER = "trainer-0"  # one fixed name: a restarted trainer finds its own pending entries
FAULT_ENV = "RLSTREAM_FAULT"  # failpoint for crash tests: "after_commit:<step>" SIGKILLs there
RESCAN_EVERY_S = 10.0  # idle re-reads of the pending list (see rescan_pending)
FILTER_REASON = "dynamic_filter_fn"
NO_STEP_TRAINED = "no step was trained: every admitted group was rejected; see `rlstream audit {}` and the worker logs"


def rejected_total(state: RunState) -> int:
    """Groups rejected and never trained, by anyone (incomplete, non-finite advantage, failed
    rollout job); dynamic_filter_fn rejections have their own ratio."""
    return sum(1 for gid, reason in state.rejected.items() if reason != FILTER_REASON and gid not in state.trained)


class Trainer:
    def __init__(self, cfg: Config, r: redis.Redis, run_dir: Path):
        self.cfg, self.r, self.run_dir = cfg, r, run_dir
        self.device = setup_torch(cfg.device, cfg.torch_threads, cfg.seed)
        self.model, self.tokenizer = load_model_and_tokenizer(str(base_model_path(cfg, run_dir)), self.device)
        self.model.train()
        if cfg.tokenizer_model:  # before the reference: its tokenizer must match this one
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_model)
        self.ref_model = load_reference(cfg, self.model, self.tokenizer, self.device) if cfg.kl_beta > 0 else None
        self.optimizer = make_optimizer(self.model, cfg)
        if cfg.init_from_checkpoint:  # a new run from another run's weights + optimizer
            load_checkpoint(verify_checkpoint(Path(cfg.init_from_checkpoint)), self.model, self.optimizer, self.device)
        self.advantage_fn = resolve_advantage(cfg.advantage)
        self.filter_fn, self.evaluation_fn = load_filter(cfg), load_evaluation(cfg)
        self.wandb = make_logger(cfg)
        self.filtered = {"kept": 0, "rejected": 0}  # dynamic_filter_fn decisions since the last step
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.state, self.cursor = RunState(), "0-0"
        self.last_commit_id = "0-0"
        self.assembler, self.ready, self.consumer = GroupAssembler(), [], CONSUMER
        self.connection_errors, self.errors_seen = buffer.count_connection_errors(r), 0
        self.last_rescan = time.monotonic()
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.step = self.version = 0

    # ----------------------------------------------------------------- read + group
    def follow_events(self) -> list[bus.Entry]:
        entries, self.cursor = bus.read_events(self.r, self.cfg.run_id, self.cursor)
        for event_id, msg in entries:
            self.state.apply(msg)
            if isinstance(msg, StepCommitted):
                self.last_commit_id = event_id
        return entries

    def data_exhausted(self) -> bool:
        """Every admitted group is settled or waiting in ``ready``, and no row is left."""
        if self.state.exhausted_groups is None:
            return False
        ready_ids = {g.group_id for g in self.ready}
        return all(g.group_id in ready_ids for g in self.state.open_groups)

    def add_samples(self, entries: list[tuple[str, RolloutSample]]) -> None:
        settled, duplicates = self.state.settled_groups, []
        for entry_id, sample in entries:
            group, dup = self.assembler.add(entry_id, sample, settled)
            if group is not None:
                self.admit_group(group)
            if dup is not None:
                duplicates.append(dup)
        ack_untrained(self.r, self.cfg.run_id, duplicates)

    def add_invalid(self, samples: list[RolloutSample | DeadLetter]) -> None:
        """Dead-lettered members of admitted groups (their GroupAdmitted precedes them, so
        call this after a fold): they settle their group instead of leaving it open."""
        for sample in samples:
            if sample.group_id in self.state.admitted:
                self.assembler.add_invalid(sample, self.state.settled_groups)

    def collect_groups(self) -> None:
        """One blocking read of new entries, then the events that arrived meanwhile."""
        invalid: list[bus.Entry] = []
        entries = buffer.read_group(self.r, self.cfg.run_id, CONSUMER, count=512, block_ms=200,
                                     vocab_size=self.vocab_size, max_seq_len=self.cfg.max_seq_len, invalid=invalid)
        self.add_samples(entries)
        self.rescan_pending(idle=not entries, invalid=invalid)
        self.follow_events()
        self.add_invalid([s for _, s in invalid])
        for group in self.assembler.pop_stale(2.0 * self.cfg.job_timeout):
            if len(group.members) >= self.cfg.min_group_size:
                self.admit_group(group)
            elif group.accounted_for:
                self.reject(group, f"incomplete: {len(group.members)} of {group.size} samples valid, "
                                   f"{len(group.invalid)} dead-lettered (see `rlstream dead {self.cfg.run_id}`)")
            else:
                self.reject(group, f"incomplete: {len(group.members)} of {group.size} samples valid after "
                                   f"{2 * self.cfg.job_timeout}s")

    def rescan_pending(self, *, idle: bool, invalid: list[bus.Entry]) -> None:
        """Redis makes entries pending before it replies to XREADGROUP: when the reply is lost
        (connection drop), the client's retried ``>`` read skips them. Re-read the pending
        list after every connection error the client retried through, and every
        RESCAN_EVERY_S while idle, taking only entries this trainer does not hold (acking a
        held one would lose it in a crash before its commit)."""
        errors = self.connection_errors()
        if errors == self.errors_seen and not (idle and time.monotonic() - self.last_rescan > RESCAN_EVERY_S):
            return
        self.errors_seen, self.last_rescan = errors, time.monotonic()
        held = self.assembler.held_entry_ids() | {e for g in self.ready for e in g.entry_ids}
        found = buffer.read_unheld_pending(self.r, self.cfg.run_id, CONSUMER, held, vocab_size=self.vocab_size,
                                            max_seq_len=self.cfg.max_seq_len, invalid=invalid)
        if found:
            log.warning("picked up %d pending entries no read had returned (a lost reply?)", len(found))
            self.add_samples(found)

    def reject(self, group: Group, reason: str) -> None:
        self.state.apply(reject_group(self.r, self.cfg.run_id, group.group_id, group.entry_ids, reason))

    def admit_group(self, group: Group) -> None:
        """Score a complete group; one without a finite advantage is rejected with a reason."""
        group.advantages_G = self.advantage_fn(group.rewards_G)
        if not torch.isfinite(group.advantages_G).all():
            self.reject(group, f"advantage is not finite for {len(group.members)} sample(s)")
            return
        if self.filter_fn is not None:
            keep = bool(self.filter_fn(group))
            self.filtered["kept" if keep else "rejected"] += 1
            if not keep:
                self.reject(group, FILTER_REASON)
                return
        self.ready.append(group)

    # ----------------------------------------------------------------- the step
    def optimize(self, groups: list[Group], lr: float | None = None) -> dict[str, float]:
        """One optimizer batch; ``lr`` = the schedule's unless given (replay passes the recorded one)."""
        samples = [s for g in groups for s in g.samples]
        batch = collate(samples, torch.cat([g.advantages_G for g in groups]), self.pad_id, self.device)
        if lr is None:
            lr = self.cfg.learning_rate * lr_multiplier(self.step, schedule=self.cfg.lr_schedule,
                                                        warmup_steps=self.cfg.lr_warmup_steps,
                                                        total_steps=self.cfg.max_steps)
        train_metrics = policy_update(self.model, self.optimizer, batch, cfg=self.cfg, lr=lr, ref_model=self.ref_model)
        self.step, self.version = self.step + 1, self.version + 1
        return train_metrics

    def train_step(self, groups: list[Group], wait_time: float) -> dict[str, float]:
        t0 = time.monotonic()
        samples = [s for g in groups for s in g.samples]
        train_metrics = self.optimize(groups)
        interval = self.cfg.weight_sync_interval
        published = None
        if interval and self.version % interval == 0:
            published = publish_weights(self.model, self.tokenizer, self.run_dir, self.version, self.cfg.keep_weights)
        decided = self.filtered["kept"] + self.filtered["rejected"]
        sampled_at = torch.tensor([float(s.min_version) for s in samples])
        worker_counts = bus.rollout_stats(self.r, self.cfg.run_id)
        metrics = {
            "step": self.step, "version": self.version,
            "rollout/reward_mean": sum(s.reward for s in samples) / len(samples), "rollout/samples": len(samples),
            "rollout/groups": len(groups), "rollout/rejected_groups_total": rejected_total(self.state),
            "rollout/invalid_samples_total": worker_counts.get("invalid_samples", 0),
            "rollout/failures_total": worker_counts.get("rollout_failures", 0),
            "async/version_offset_max": (self.version - 1 - sampled_at).max().item(),
            "async/version_offset_mean": (self.version - 1 - sampled_at).mean().item(),
            "async/submit_offset_max": max(self.version - 1 - s.submit_version for s in samples),
            "rollout/filter_reject_ratio": self.filtered["rejected"] / decided if decided else 0.0,
            **train_metrics,
            "perf/train_wait_time": wait_time, "perf/step_time": time.monotonic() - t0,
        }
        self.filtered = {"kept": 0, "rejected": 0}
        self.last_commit_id = commit_step(self.r, self.cfg.run_id, StepCommitted(
            step=self.step, version=self.version, entry_ids=[e for g in groups for e in g.entry_ids],
            sample_ids=[s.sample_id for s in samples], group_ids=[g.group_id for g in groups], metrics=metrics))
        self._failpoint("after_commit")
        if published is not None:
            publish(self.r, self.cfg.run_id, published)
        self.metrics.write(metrics)
        if self.wandb is not None:
            self.wandb.log(metrics)
        if self.cfg.dcp_save_interval and self.step % self.cfg.dcp_save_interval == 0:
            self.checkpoint()
        if published is not None and self.version % self.cfg.evaluation_interval == 0:
            self.evaluate()
        return metrics

    def evaluate(self) -> None:
        """Run evaluation_fn on the current weights; record an ``Evaluated`` event and a
        metrics line (``eval/version`` marks it)."""
        if self.evaluation_fn is None or self.state.last_evaluated == self.version:
            return
        from rlstream.sampling.local import LocalPolicy, LocalSampler

        sample_kwargs = self.cfg.sample_kwargs()
        policy = LocalPolicy.from_model(self.model, self.tokenizer, self.device, self.version)
        ctx = EvaluationContext(LocalSampler(policy, sample_kwargs), self.tokenizer, self.version, self.step,
                                sample_kwargs, dict(self.cfg.extras), config=self.cfg)
        with rng_untouched(self.device):  # replay does not evaluate: keep the training RNG where it was
            metrics = run_evaluation(self.evaluation_fn, ctx)
        bus.xadd(self.r, keys.events(self.cfg.run_id), Evaluated(step=self.step, version=self.version,
                                                                     metrics=metrics))
        self.state.last_evaluated = self.version
        line = {"step": self.step, "version": self.version, "eval/version": self.version, **metrics}
        self.metrics.write(line)
        if self.wandb is not None:
            self.wandb.log(line)

    def checkpoint(self) -> None:
        if holds_commit(checkpoint_dir(self.run_dir, self.step), self.last_commit_id):
            return  # already saved at this step (interval and final coincide)
        save_checkpoint(self.run_dir, CheckpointState(self.step, self.version, self.last_commit_id,
                                                      len(self.state.rows_admitted)),
                        self.model, self.tokenizer, self.optimizer)

    def _failpoint(self, name: str) -> None:
        if os.environ.get(FAULT_ENV) == f"{name}:{self.step}":
            log.warning("failpoint %s:%d: SIGKILL", name, self.step)
            os.kill(os.getpid(), signal.SIGKILL)

    # ----------------------------------------------------------------- the loop
    def run(self) -> int:
        config_path = self.run_dir / "config.json"
        private_dir(self.run_dir)  # owner-only (0700), as `rlstream up` makes it
        if not config_path.exists():  # standalone (compose) runs: status/audit/dead find the run by it
            config_path.write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=1))
        bus.ensure_group(self.r, keys.rollouts(self.cfg.run_id))
        resume(self)  # reads the whole pending list: the next rescan is due only later
        self.errors_seen, self.last_rescan = self.connection_errors(), time.monotonic()
        if self.step == 0:
            self.evaluate()  # the base model, before any update
        P, reason = self.cfg.prompt_groups_per_step, "max_steps"
        while self.state.finished is None and (self.cfg.max_steps is None or self.step < self.cfg.max_steps):
            t_wait = time.monotonic()
            while len(self.ready) < P and not self.data_exhausted() and self.state.finished is None:
                self.collect_groups()
            if self.state.finished is not None:
                log.info("trainer: run ended elsewhere (%s)", self.state.finished.reason)
                return self.step
            if not self.ready:
                reason = "data exhausted"
                break
            groups, self.ready = take_oldest(self.ready, P)
            m = self.train_step(groups, wait_time=time.monotonic() - t_wait)
            log.info("step %d v%d reward %.3f loss %.4f offset<=%d wait %.2fs step %.2fs", m["step"], m["version"],
                     m["rollout/reward_mean"], m["train/loss"], m["async/version_offset_max"],
                     m["perf/train_wait_time"], m["perf/step_time"])
        if self.state.finished is None:
            failed = reason == "data exhausted" and self.step == 0  # must not look like a success
            self.finish(NO_STEP_TRAINED.format(self.cfg.run_id) if failed else reason, failed=failed)
        return self.step

    def finish(self, reason: str, failed: bool = False) -> None:
        self.evaluate()  # the final weights (skipped when this version was just evaluated)
        if self.wandb is not None:
            self.wandb.finish()
        if self.cfg.save_final_checkpoint and self.step > 0:
            self.checkpoint()
        if self.cfg.output_model_id:
            log.info("exported %s", export_model(self.model, self.tokenizer, self.run_dir, self.cfg.output_model_id))
        finished = RunFinished(reason=reason, step=self.step, version=self.version, failed=failed)
        bus.xadd(self.r, keys.events(self.cfg.run_id), finished)
        self.state.apply(finished)
        (log.error if failed else log.info)("trainer: run finished (%s) at step %d", reason, self.step)
