"""The trainer: read, gate, group, loss, step, publish, commit, log.

``train_step`` is the algorithm on one screen; ``collect_groups`` reads the durable buffer
(the consumer group's pending-entries list); ``resume`` rebuilds the exact state of a
crashed trainer (newest checkpoint + replay of every ``StepCommitted`` after it on the very
samples it names + this consumer's pending entries), so no sample is lost or trained twice
and step numbers continue without gap; ``run`` loops until the run ends.
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

from rlstream import keys, streams
from rlstream.codec import decode
from rlstream.config import Config
from rlstream.errors import RlstreamError
from rlstream.messages import Evaluated, RolloutSample, RunFinished, StepCommitted
from rlstream.metrics import MetricsLog
from rlstream.run_state import RunState
from rlstream.torch_setup import load_model_and_tokenizer, setup_torch
from trainer.advantages import resolve_advantage
from trainer.batch import Group, GroupAssembler, collate
from trainer.checkpoint import CheckpointState, export_model, latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.commit import ack_untrained, commit_step, publish, reject_group
from trainer.hooks import EvaluationContext, load_evaluation, load_filter, run_evaluation
from trainer.optimize import policy_update
from trainer.policy_model import base_model_path, load_reference, publish_weights
from trainer.schedule import lr_multiplier
from trainer.wandb_log import make_logger

log = logging.getLogger(__name__)
CONSUMER = "trainer-0"  # one fixed name: a restarted trainer finds its own pending entries
FAULT_ENV = "RLSTREAM_FAULT"  # failpoint for crash tests: "after_commit:<step>" SIGKILLs there


class Trainer:
    def __init__(self, cfg: Config, r: redis.Redis, run_dir: Path):
        self.cfg, self.r, self.run_dir = cfg, r, run_dir
        self.device = setup_torch(cfg.device, cfg.torch_threads, cfg.seed)
        self.model, self.tokenizer = load_model_and_tokenizer(str(base_model_path(cfg, run_dir)), self.device)
        self.model.train()
        self.ref_model = load_reference(cfg, self.model, self.tokenizer, self.device) if cfg.kl_beta > 0 else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                           weight_decay=0.01, eps=1e-8)
        if cfg.init_from_checkpoint:  # a new run from another run's weights + optimizer
            load_checkpoint(Path(cfg.init_from_checkpoint), self.model, self.optimizer, self.device)
        if cfg.tokenizer_model:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_model)
        self.advantage_fn = resolve_advantage(cfg.advantage)
        self.filter_fn, self.evaluation_fn = load_filter(cfg), load_evaluation(cfg)
        self.wandb = make_logger(cfg)
        self.rejected_groups = 0
        self.filtered = {"kept": 0, "rejected": 0}  # dynamic_filter_fn decisions since the last step
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.state, self.cursor = RunState(), "0-0"
        self.committed: list[StepCommitted | Evaluated] | None = None  # collected only while resuming
        self.last_commit_id = "0-0"
        self.assembler, self.ready = GroupAssembler(), []
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.step = self.version = 0

    # ----------------------------------------------------------------- read + group
    def follow_events(self) -> None:
        entries, self.cursor = streams.read_events(self.r, self.cfg.run_id, self.cursor)
        for event_id, msg in entries:
            self.state.apply(msg)
            if isinstance(msg, StepCommitted):
                self.last_commit_id = event_id
            if self.committed is not None and isinstance(msg, (StepCommitted, Evaluated)):
                self.committed.append(msg)

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

    def collect_groups(self) -> None:
        """One blocking read of new entries, then the events that arrived meanwhile."""
        self.add_samples(streams.read_group(self.r, self.cfg.run_id, CONSUMER, count=512, block_ms=200,
                                            vocab_size=self.vocab_size, max_seq_len=self.cfg.max_seq_len))
        for group in self.assembler.pop_stale(2.0 * self.cfg.job_timeout):
            if len(group.members) >= self.cfg.min_group_size:
                self.admit_group(group)
            else:
                self.rejected_groups += 1
                reject_group(self.r, self.cfg.run_id, group.group_id, group.entry_ids,
                             f"incomplete: {len(group.members)} of {group.size} samples after {2 * self.cfg.job_timeout}s")
        self.follow_events()

    def admit_group(self, group: Group) -> None:
        """Score a complete group; one without a finite advantage is rejected with a reason."""
        group.advantages_G = self.advantage_fn(group.rewards_G)
        if not torch.isfinite(group.advantages_G).all():
            self.rejected_groups += 1
            reject_group(self.r, self.cfg.run_id, group.group_id, group.entry_ids,
                         f"advantage is not finite for {len(group.members)} sample(s)")
            return
        if self.filter_fn is not None:
            keep = bool(self.filter_fn(group))
            self.filtered["kept" if keep else "rejected"] += 1
            if not keep:
                reject_group(self.r, self.cfg.run_id, group.group_id, group.entry_ids, "dynamic_filter_fn")
                return
        self.ready.append(group)

    # ----------------------------------------------------------------- the step
    def optimize(self, groups: list[Group]) -> dict[str, float]:
        samples = [s for g in groups for s in g.samples]
        batch = collate(samples, torch.cat([g.advantages_G for g in groups]), self.pad_id, self.device)
        lr = self.cfg.learning_rate * lr_multiplier(self.step, schedule=self.cfg.lr_schedule,
                                                    warmup_steps=self.cfg.lr_warmup_steps, total_steps=self.cfg.max_steps)
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
        metrics = {
            "step": self.step, "version": self.version,
            "rollout/reward_mean": sum(s.reward for s in samples) / len(samples), "rollout/samples": len(samples),
            "rollout/groups": len(groups), "rollout/rejected_groups_total": self.rejected_groups,
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
        from workers.local_policy import LocalPolicy, LocalSampler

        sample_kwargs = self.cfg.sample_kwargs()
        policy = LocalPolicy.from_model(self.model, self.tokenizer, self.device, self.version)
        ctx = EvaluationContext(LocalSampler(policy, sample_kwargs), self.tokenizer, self.version, self.step,
                                sample_kwargs, dict(self.cfg.extras))
        metrics = run_evaluation(self.evaluation_fn, ctx)
        streams.xadd(self.r, keys.events(self.cfg.run_id), Evaluated(step=self.step, version=self.version,
                                                                     metrics=metrics))
        self.state.last_evaluated = self.version
        line = {"step": self.step, "version": self.version, "eval/version": self.version, **metrics}
        self.metrics.write(line)
        if self.wandb is not None:
            self.wandb.log(line)

    def checkpoint(self) -> None:
        if (self.run_dir / "checkpoints" / f"step-{self.step}").is_dir():
            return  # already saved at this step (interval and final coincide)
        save_checkpoint(self.run_dir, CheckpointState(self.step, self.version, self.last_commit_id,
                                                      len(self.state.rows_admitted)),
                        self.model, self.tokenizer, self.optimizer)

    def _failpoint(self, name: str) -> None:
        if os.environ.get(FAULT_ENV) == f"{name}:{self.step}":
            log.warning("failpoint %s:%d: SIGKILL", name, self.step)
            os.kill(os.getpid(), signal.SIGKILL)

    # ----------------------------------------------------------------- resume
    def replay(self, committed: StepCommitted) -> None:
        """Re-run a committed step on exactly the samples it names, in the same order."""
        raw = streams.fetch_entries(self.r, keys.rollouts(self.cfg.run_id), committed.entry_ids)
        missing = [e for e in committed.entry_ids if e not in raw]
        if missing:
            raise RlstreamError(f"cannot replay step {committed.step}: {len(missing)} of its samples are gone from "
                                "the rollouts stream (was it trimmed past the newest checkpoint?)")
        groups: dict[str, Group] = {gid: Group(gid, 0) for gid in committed.group_ids}
        for entry_id in committed.entry_ids:
            sample = decode(raw[entry_id], expect=RolloutSample)
            groups[sample.group_id].members[sample.sample_id] = (entry_id, sample)
        for group in groups.values():
            group.advantages_G = self.advantage_fn(group.rewards_G)
        self.optimize(list(groups.values()))
        if (self.step, self.version) != (committed.step, committed.version):
            raise RlstreamError(f"replay diverged: at step {self.step} v{self.version}, event says "
                                f"step {committed.step} v{committed.version}")

    def resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None:
            restored = load_checkpoint(checkpoint, self.model, self.optimizer, self.device)
            self.step, self.version = restored.step, restored.version
            log.info("resuming from %s (step %d)", checkpoint, self.step)
        self.committed = []
        self.follow_events()
        all_committed, self.committed = self.committed, None
        for committed in all_committed:
            if isinstance(committed, StepCommitted) and committed.step > self.step:
                self.replay(committed)
        if self.step != self.state.steps:
            raise RlstreamError(f"events record {self.state.steps} steps but replay reached {self.step}")
        if self.step:
            log.info("replayed to step %d v%d", self.step, self.version)
        interval = self.cfg.weight_sync_interval
        if self.state.latest_weights is None or (
            interval and self.version % interval == 0 and self.state.published_version < self.version
        ):
            # Fresh run (v0), or a crash between commit and publish: publish now.
            publish(self.r, self.cfg.run_id, publish_weights(self.model, self.tokenizer, self.run_dir, self.version,
                                                             self.cfg.keep_weights))
        self.metrics.path.write_text("")  # the events are the record: rebuild metrics.jsonl from them
        for event in all_committed:
            self.metrics.write(event.metrics if isinstance(event, StepCommitted) else
                               {"step": event.step, "version": event.version, "eval/version": event.version,
                                **event.metrics})
        self.assembler.completed |= self.state.settled_groups
        after: str | None = "0"
        while after is not None:
            entries, after = streams.read_pending(self.r, self.cfg.run_id, CONSUMER, after, count=512,
                                                  vocab_size=self.vocab_size, max_seq_len=self.cfg.max_seq_len)
            self.add_samples(entries)

    # ----------------------------------------------------------------- the loop
    def run(self) -> int:
        config_path = self.run_dir / "config.json"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not config_path.exists():  # standalone (compose) runs: status/audit/dead find the run by it
            config_path.write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=1))
        streams.ensure_group(self.r, keys.rollouts(self.cfg.run_id))
        self.resume()
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
            groups, self.ready = self.ready[:P], self.ready[P:]
            m = self.train_step(groups, wait_time=time.monotonic() - t_wait)
            log.info("step %d v%d reward %.3f loss %.4f offset<=%d wait %.2fs step %.2fs", m["step"], m["version"],
                     m["rollout/reward_mean"], m["train/loss"], m["async/version_offset_max"],
                     m["perf/train_wait_time"], m["perf/step_time"])
        if self.state.finished is None:
            self.finish(reason)
        return self.step

    def finish(self, reason: str) -> None:
        self.evaluate()  # the final weights (skipped when this version was just evaluated)
        if self.wandb is not None:
            self.wandb.finish()
        if self.cfg.save_final_checkpoint and self.step > 0:
            self.checkpoint()
        if self.cfg.output_model_id:
            log.info("exported %s", export_model(self.model, self.tokenizer, self.run_dir, self.cfg.output_model_id))
        streams.xadd(self.r, keys.events(self.cfg.run_id), RunFinished(reason=reason, step=self.step,
                                                                       version=self.version))
        log.info("trainer: run finished (%s) at step %d", reason, self.step)
