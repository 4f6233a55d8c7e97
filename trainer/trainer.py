"""The trainer: read, gate, group, loss, step, publish, commit, log.

``train_step`` is the whole algorithm on one screen; ``collect_groups`` reads the durable
buffer (the consumer group's pending-entries list); ``run`` loops until the run ends.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import redis
import torch

from rlstream import keys, streams
from rlstream.config import Config
from rlstream.errors import RlstreamError
from rlstream.messages import RunFinished, StepCommitted
from rlstream.metrics import MetricsLog
from rlstream.run_state import RunState
from rlstream.torch_setup import load_model_and_tokenizer, setup_torch
from trainer.advantages import resolve_advantage
from trainer.batch import Group, GroupAssembler, collate
from trainer.commit import ack_untrained, commit_step, publish, reject_group
from trainer.optimize import policy_update
from trainer.policy_model import base_model_path, load_reference, publish_weights
from trainer.schedule import lr_multiplier

log = logging.getLogger(__name__)
CONSUMER = "trainer-0"  # one fixed name: a restarted trainer finds its own pending entries


class Trainer:
    def __init__(self, cfg: Config, r: redis.Redis, run_dir: Path):
        self.cfg, self.r, self.run_dir = cfg, r, run_dir
        self.device = setup_torch(cfg.device, cfg.torch_threads, cfg.seed)
        self.model, self.tokenizer = load_model_and_tokenizer(str(base_model_path(cfg, run_dir)), self.device)
        self.model.train()
        self.ref_model = load_reference(cfg, self.model, self.tokenizer, self.device) if cfg.kl_beta > 0 else None
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                                           weight_decay=0.01, eps=1e-8)
        self.advantage_fn = resolve_advantage(cfg.advantage)
        self.rejected_groups = 0
        self.vocab_size = self.model.get_input_embeddings().num_embeddings
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.state, self.cursor = RunState(), "0-0"
        self.assembler, self.ready = GroupAssembler(), []
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.step = self.version = 0

    # ----------------------------------------------------------------- read + group
    def follow_events(self) -> None:
        entries, self.cursor = streams.read_events(self.r, self.cfg.run_id, self.cursor)
        for _, msg in entries:
            self.state.apply(msg)

    def data_exhausted(self) -> bool:
        """Every admitted group is settled or waiting in ``ready``, and no row is left."""
        if self.state.exhausted_groups is None:
            return False
        ready_ids = {g.group_id for g in self.ready}
        return all(g.group_id in ready_ids for g in self.state.open_groups)

    def collect_groups(self, pending: bool = False) -> None:
        """One read: pending entries first after a restart, then new ones (blocking)."""
        entries = streams.read_group(self.r, self.cfg.run_id, CONSUMER, count=512, block_ms=200, pending=pending,
                                     vocab_size=self.vocab_size, max_seq_len=self.cfg.max_seq_len)
        settled, duplicates = self.state.settled_groups, []
        for entry_id, sample in entries:
            group, dup = self.assembler.add(entry_id, sample, settled)
            if group is not None:
                self.admit_group(group)
            if dup is not None:
                duplicates.append(dup)
        ack_untrained(self.r, self.cfg.run_id, duplicates)
        self.follow_events()

    def admit_group(self, group: Group) -> None:
        """Score a complete group; one without a finite advantage is rejected with a reason."""
        group.advantages_G = self.advantage_fn(group.rewards_G)
        if not torch.isfinite(group.advantages_G).all():
            self.rejected_groups += 1
            reject_group(self.r, self.cfg.run_id, group.group_id, group.entry_ids,
                         f"advantage is not finite for {len(group.members)} sample(s)")
            return
        self.ready.append(group)

    # ----------------------------------------------------------------- the step
    def train_step(self, groups: list[Group], wait_time: float) -> dict[str, float]:
        t0 = time.monotonic()
        samples = [s for g in groups for s in g.samples]
        rewards_B = torch.tensor([s.reward for s in samples])
        advantages_B = torch.cat([g.advantages_G for g in groups])
        batch = collate(samples, advantages_B, self.pad_id, self.device)

        lr = self.cfg.learning_rate * lr_multiplier(self.step, schedule=self.cfg.lr_schedule,
                                                    warmup_steps=self.cfg.lr_warmup_steps, total_steps=self.cfg.max_steps)
        train_metrics = policy_update(self.model, self.optimizer, batch, cfg=self.cfg, lr=lr, ref_model=self.ref_model)
        self.step, self.version = self.step + 1, self.version + 1

        published = publish_weights(self.model, self.tokenizer, self.run_dir, self.version, self.cfg.keep_weights)
        sample_versions = torch.tensor([float(s.min_version) for s in samples])
        metrics = {
            "step": self.step, "version": self.version,
            "rollout/reward_mean": rewards_B.mean().item(), "rollout/samples": len(samples),
            "rollout/groups": len(groups), "rollout/rejected_groups_total": self.rejected_groups,
            "async/version_offset_max": (self.version - 1 - sample_versions).max().item(),
            "async/version_offset_mean": (self.version - 1 - sample_versions).mean().item(),
            "async/submit_offset_max": max(self.version - 1 - s.submit_version for s in samples),
            **train_metrics,
            "perf/train_wait_time": wait_time, "perf/step_time": time.monotonic() - t0,
        }
        commit_step(self.r, self.cfg.run_id, StepCommitted(
            step=self.step, version=self.version, entry_ids=[e for g in groups for e in g.entry_ids],
            sample_ids=[s.sample_id for s in samples], group_ids=[g.group_id for g in groups], metrics=metrics))
        publish(self.r, self.cfg.run_id, published)
        self.metrics.write(metrics)
        return metrics

    # ----------------------------------------------------------------- the loop
    def run(self) -> int:
        self.follow_events()
        if self.state.steps > 0:
            raise RlstreamError(f"run {self.cfg.run_id} already has {self.state.steps} committed steps; "
                                "resuming a trainer is not implemented yet: start a new run_id")
        streams.ensure_group(self.r, keys.rollouts(self.cfg.run_id))
        publish(self.r, self.cfg.run_id, publish_weights(self.model, self.tokenizer, self.run_dir, 0,
                                                         self.cfg.keep_weights))
        P, reason = self.cfg.prompt_groups_per_step, "max_steps"
        while self.cfg.max_steps is None or self.step < self.cfg.max_steps:
            t_wait = time.monotonic()
            while len(self.ready) < P and not self.data_exhausted():
                self.collect_groups()
            if not self.ready:
                reason = "data exhausted"
                break
            groups, self.ready = self.ready[:P], self.ready[P:]
            m = self.train_step(groups, wait_time=time.monotonic() - t_wait)
            log.info("step %d v%d reward %.3f loss %.4f offset<=%d wait %.2fs step %.2fs", m["step"], m["version"],
                     m["rollout/reward_mean"], m["train/loss"], m["async/version_offset_max"],
                     m["perf/train_wait_time"], m["perf/step_time"])
        streams.xadd(self.r, keys.events(self.cfg.run_id), RunFinished(reason=reason, step=self.step,
                                                                       version=self.version))
        log.info("trainer: run finished (%s) at step %d", reason, self.step)
        return self.step
