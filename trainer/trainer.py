"""The trainer: the algorithm's loop. Take the oldest ready groups, update the policy on
their advantages, commit the step, log, and write and publish the weights beside the next
step (``weight_sync``); checkpoint and evaluate when due.

``train_step`` is one step on one screen, in the commit protocol's order; ``run`` loops it
until the run ends; ``resume`` first rebuilds the exact state of a crashed trainer, so no
sample is lost or trained twice and step numbers continue without gap. Reading and
grouping the rollouts is ``buffer.RolloutBuffer``'s, the metrics lines are
``step_metrics``', and resume's decisions are pure helpers in ``resume``.

Under torchrun (``trainer.nproc_per_node`` > 1) every rank builds a ``Trainer`` and shards
its models (FSDP2); rank 0 alone has Redis and runs everything above, and before each piece of
work every rank does together it tells the others (``rank_protocol``: the batch of a step, a
weights gather, a checkpoint); the other ranks ``run`` by following it (docs/design.md §15.82
Rank 0 speaks for the trainer's ranks).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import redis
import torch

from rlstream.core import bus, keys
from rlstream.core.config import Config
from rlstream.core.credentials import private_dir
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import Evaluated, RunFinished, StepCommitted, WeightsPublished
from rlstream.core.metrics import MetricsLog
from rlstream.core.run_state import RunState
from rlstream.sampling.torch_setup import setup_torch
from rlstream.trainer import failpoints, lora, sharded
from rlstream.trainer.advantages import finite_values, resolve_advantage
from rlstream.trainer.batch import Group, collate, token_advantages_of
from rlstream.trainer.buffer import RolloutBuffer
from rlstream.trainer.checkpoint import (
    CheckpointState,
    checkpoint_dir,
    export_model,
    holds_commit,
    load_checkpoint,
    read_state,
    rng_untouched,
    save_checkpoint,
    verify_checkpoint,
)
from rlstream.trainer.commit import commit_step, publish, step_record
from rlstream.trainer.hooks import (
    EVAL_FAILED,
    EvaluationContext,
    filter_keeps,
    hook_failed,
    load_evaluation,
    load_filter,
    run_evaluation,
)
from rlstream.trainer.igpo import igpo_advantages
from rlstream.trainer.lease import RollbackWatch, TrainerLease, fenced_write
from rlstream.trainer.optimize import make_optimizer, policy_update
from rlstream.trainer.perf_metrics import PerfClock
from rlstream.trainer.policy_model import base_model_path, load_base, load_reference
from rlstream.trainer.precision import prepare
from rlstream.trainer.rank_protocol import (
    CHECKPOINT,
    EXPORT,
    LOAD,
    OPTIMIZE,
    STOP,
    STREAM,
    STREAM_ADD,
    WEIGHTS,
    WRITE_WEIGHTS,
    Channel,
    follow,
)
from rlstream.trainer.ranks import init_ranks, shard
from rlstream.trainer.resume import (
    check_replayed,
    committed_groups,
    fold_record,
    must_publish,
    rebuild_metrics,
    snapshot_checkpoint,
    sync_committed_record,
    usable_checkpoint,
)
from rlstream.trainer.retention import Retention
from rlstream.trainer.schedule import due, lr_multiplier
from rlstream.trainer.step_metrics import FILTER_REASON, LiveRun, RejectionTally, eval_metrics, step_metrics
from rlstream.trainer.streaming import StreamingStep
from rlstream.trainer.wandb_log import make_logger
from rlstream.trainer.weight_sync import Pending, WeightSync

log = logging.getLogger(__name__)
NO_STEP_TRAINED = "no step was trained: every admitted group was rejected; see `rlstream audit {}` and the worker logs"


class Trainer:
    def __init__(self, cfg: Config, r: redis.Redis | None, run_dir: Path):
        """``r``: the run's Redis; None on a rank other than 0, which never speaks to it."""
        self.cfg, self.r, self.run_dir = cfg, r, run_dir
        # One process (ranks.SINGLE: no collective) unless torchrun started several; on CUDA each rank takes its
        # LOCAL_RANK's GPU (docs/design.md §15.81 Exact steps across trainer ranks)
        self.ranks = init_ranks(setup_torch(cfg.trainer_device, cfg.torch_threads, cfg.seed),
                                cfg.trainer.collective_timeout)
        self.device = self.ranks.device
        if cfg.trainer.shared_prefix and self.ranks.distributed:  # optimize.shares_prefixes: said once, not a step
            log.info("trainer.shared_prefix: the plain forward across %d trainer ranks (FSDP's ranks must run the "
                     "same forwards; docs/design.md §15.100 A group's prompt is computed once)", self.ranks.world)
        self.channel = Channel(self.ranks)  # rank 0's commands to the others (rank_protocol)
        sharded.on_rank0(lambda: base_model_path(cfg, run_dir))  # a built-in model is built once, by rank 0
        base = base_model_path(cfg, run_dir)
        self.model, self.tokenizer = load_base(str(base), self.device, self.ranks)
        if cfg.lora_rank:  # peft adapters train, the base stays frozen
            self.model = lora.wrap(self.model, cfg)  # docs/design.md §15.38 LoRA through peft, merged when published
        # what its (adapter) checkpoints hold it to: rank 0's reading (its error raised on every rank), so that
        # every rank decides alike
        self.base_fingerprint = self.ranks.from_rank0(sharded.on_rank0(lambda: lora.base_fingerprint(self.model, base)))
        # Float32 masters of the trainable weights (after the LoRA wrap: a frozen base keeps its dtype), before the
        # reference copies them (docs/design.md §15.40 Float32 masters, autocast compute, weights published as stored)
        self.precision = prepare(self.model, cfg.trainer.dtype, self.device, cfg.trainer.gradient_checkpointing)
        # Every forward of the policy runs with dropout off (docs/design.md §15.19 The trainer computes logprobs
        # with dropout off; autograd does not care about the mode): in eval mode for good, no forward switches it.
        self.model.eval()
        if cfg.tokenizer_model:  # before the reference: its tokenizer must match this one
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_model)
        self.ref_model = load_reference(cfg, self.model, self.tokenizer, self.device, self.ranks) \
            if cfg.kl_beta > 0 else None
        if self.ranks.distributed:  # FSDP2: every block, then the root, before the optimizer sees the parameters
            # the masters are the unsharded parameters: published weights are cast once gathered instead. Dropped
            # first: on rank 0 fully_shard moves each one whole to the device, which a reference here would keep.
            self.precision = self.precision.sharded()
            self.model = shard(self.model, self.ranks, self.precision.compute)
            if self.ref_model is not None and not isinstance(self.ref_model, lora.AdapterDisabled):
                self.ref_model = shard(self.ref_model, self.ranks, self.precision.compute)  # a LoRA one is the policy
        self.optimizer = make_optimizer(self.model, cfg)
        if cfg.init_from_checkpoint:  # a new run from another run's weights + optimizer (every rank: a collective)
            load_checkpoint(verify_checkpoint(Path(cfg.init_from_checkpoint)), self.model, self.optimizer, self.device,
                            self.base_fingerprint)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.step = self.version = 0
        self.lease = TrainerLease(r, cfg.run_id) if r is not None else None  # taken in run() (or resume())
        self.weight_sync = WeightSync(r, cfg.run_id, self.lease, run_dir, cfg.keep_weights,
                                      process=cfg.trainer.weight_writer == "process")
        if self.ranks.rank == 0:
            self._protocol(cfg, r, run_dir)

    def _protocol(self, cfg: Config, r: redis.Redis, run_dir: Path) -> None:
        """Rank 0's part: the run's protocol (Redis, the lease, the buffer, the logs, the hooks)."""
        # igpo's advantages need the policy and the samples' turns: set_advantages computes them
        self.advantage_fn = None if cfg.advantage == "igpo" else resolve_advantage(cfg.advantage)
        self.filter_fn, self.evaluation_fn = load_filter(cfg), load_evaluation(cfg)
        if cfg.advantage == "igpo" and self.ranks.distributed:  # preflight refuses it first
            raise RlstreamError("advantage = \"igpo\" with several trainer ranks is not supported yet "
                                "(docs/scaling-trainer.md): set trainer.nproc_per_node = 1")
        if self.evaluation_fn is not None and self.ranks.distributed:  # preflight refuses it first
            raise RlstreamError("evaluation_fn with several trainer ranks is not supported yet "
                                "(docs/scaling-trainer.md): set trainer.nproc_per_node = 1 or drop evaluation_fn")
        self.wandb = make_logger(cfg)
        # dynamic_filter_fn decisions since the last step; the rejected groups' samples and rewards' sum
        self.filtered = {"kept": 0, "rejected": 0, "rejected_samples": 0, "rejected_reward": 0.0}
        self.state, self.cursor, self.last_commit_id = RunState(), "0-0", "0-0"
        self.rejections = RejectionTally(self.state)  # the run's rejected and stale totals, counted as they come
        assert self.lease is not None  # fences every write below
        self.buffer = RolloutBuffer(r, cfg, self.state, vocab_size=self.model.get_input_embeddings().num_embeddings,
                                    score=self.score, follow_events=self.follow_and_watch, lease=self.lease)
        self.rollback = RollbackWatch(r, cfg.run_id, self.buffer.connection_errors)
        self.metrics = MetricsLog(run_dir / "metrics.jsonl")
        self.perf = PerfClock()  # the perf/* metrics' timestamps (trainer/perf_metrics.py)
        self.retention = Retention(r, cfg, run_dir, self.lease)  # docs/design.md §15.45 Archive, then trim

    # ----------------------------------------------------------------- the loop
    def run(self) -> int:
        """Take the run's trainer lease, standing by while another trainer holds it (docs/design.md
        §7 Commit protocol), then train until the run ends; the lease is released however that ends.
        A rank other than 0 follows rank 0's commands instead, until it says stop (which it says
        only when it ends normally: on an error it exits, and torchrun ends the other ranks)."""
        if self.ranks.rank != 0:
            with frozen_heap():
                return follow(self)
        with contextlib.ExitStack() as ending:  # each runs however the run ends, even if the one before raised
            # last: a torchrun rank ends without atexit (rlstream.torchrun.end_rank), where wandb would finish its run
            ending.callback(self.finish_wandb)
            ending.callback(self.lease.release)
            ending.callback(self.weight_sync.close)  # first: the last version's publish, while the lease is ours
            # the run finished while this trainer stood by: no step
            steps = self.train_run() if self.lease.acquire() else self.step
        self.channel.send(STOP)
        return steps

    def train_run(self) -> int:
        """With the lease: resume, then one step after another until the run ends (the objects
        alive by then frozen out of the garbage collector's scans: ``frozen_heap``)."""
        config_path = self.run_dir / "config.json"
        private_dir(self.run_dir)  # owner-only (0700), as `rlstream up` makes it
        if not config_path.exists():  # standalone (compose) runs: status/audit/dead find the run by it
            config_path.write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=1))
        bus.ensure_group(self.r, keys.rollouts(self.cfg.run_id))
        self.resume()
        if self.step == 0:
            self.evaluate()  # the base model, before any update
        self.perf.restart(self.state, bus.rollout_stats(self.r, self.cfg.run_id))
        with frozen_heap():
            return self.train_steps()

    def train_steps(self) -> int:
        """One step after another until the run ends."""
        P, reason = self.cfg.prompt_groups_per_step, "max_steps"
        while self.state.finished is None and (self.cfg.max_steps is None or self.step < self.cfg.max_steps):
            t_wait = time.monotonic()
            groups, streamed = self.gather(P)  # none past the staleness bound
            if self.state.finished is not None:
                log.info("trainer: run ended elsewhere (%s)", self.state.finished.reason)
                return self.step
            if not groups:
                reason = "data exhausted"
                break
            busy = streamed.compute_time if streamed else 0.0  # forward/backward while the batch was sampled
            m = self.train_step(groups, wait_time=time.monotonic() - t_wait - busy, streamed=streamed)
            log.info("step %d v%d reward %.3f loss %.4f offset<=%d wait %.2fs step %.2fs", m["step"], m["version"],
                     m["rollout/reward_mean"], m["train/loss"], m["async/version_offset_max"],
                     m["perf/trainer_wait_for_sampler_time"], m["perf/train_time"])
        if self.state.finished is None:
            failed = reason == "data exhausted" and self.step == 0  # must not look like a success
            self.finish(NO_STEP_TRAINED.format(self.cfg.run_id) if failed else reason, failed=failed)
        return self.step

    def gather(self, P: int) -> tuple[list[Group], StreamingStep | None]:
        """The next batch's groups; with ``trainer.streaming``, their forward/backward ran as they
        arrived (``StreamingStep``, docs/design.md §15.70 Streaming accumulation divides last)."""
        if not self.cfg.trainer.streaming:
            self.buffer.fill(P, self.version)
            return ([] if self.state.finished is not None else self.buffer.take(P, self.version)), None
        self.channel.send(STREAM)
        streamed = self.streaming_step()

        def add(groups: list[Group]) -> None:
            self.channel.send(STREAM_ADD, groups)  # every rank adds the same groups, in the same order
            streamed.add(groups)

        return self.buffer.stream(P, self.version, add), streamed

    def streaming_step(self) -> StreamingStep:
        return StreamingStep(self.model, self.optimizer, cfg=self.cfg, pad_id=self.pad_id, device=self.device,
                             precision=self.precision, ref_model=self.ref_model, ranks=self.ranks)

    # ----------------------------------------------------------------- the step
    def train_step(self, groups: list[Group], wait_time: float,
                   streamed: StreamingStep | None = None) -> dict[str, float]:
        """One step on ``groups`` (scored with their advantages as they completed): update the
        policy, snapshot the weights when a sync is due, commit, log; checkpoint and evaluate
        when due. The order is the commit protocol's (``commit``): the snapshot's directory is
        written and sealed in the background (``weight_sync``, beside the next step) and
        announced only once sealed and after the commit, so a crash before the commit leaves the
        step retrained from its pending entries, and one after it a version that ``resume``
        writes and publishes."""
        t0, compute_began = time.monotonic(), time.time()
        train_metrics = self.optimize(groups, streamed=streamed)
        synced = self.sync_weights() if due(self.cfg.weight_sync_interval, self.version) else None
        try:
            metrics = step_metrics(self.step, self.version, groups, train_metrics, train_time=time.monotonic() - t0,
                                   live=self.live_run(wait_time, groups, compute_began))
            self.filtered = dict.fromkeys(self.filtered, 0)
            committed = step_record(self.step, self.version, groups, metrics)
            self.last_commit_id = commit_step(self.r, self.cfg.run_id, committed, self.lease, last_event=self.cursor)
        except BaseException:
            if synced is not None:
                synced.cancel()  # its directory may be written, never announced: the step is not committed
            raise
        failpoints.kill_self("after_commit", self.step)  # crash tests (trainer/failpoints.py)
        if synced is not None:
            synced.committed()  # published by the writer's thread once sealed (``weight_sync``)
        self.log_metrics(metrics)
        if due(self.cfg.dcp_save_interval, self.step) or self.retention.pressed(self.step):
            self.checkpoint()
        if synced is not None and self.version % self.cfg.evaluation_interval == 0:
            self.evaluate()
        return metrics

    def score(self, group: Group) -> str | None:
        """The group's advantages, then ``dynamic_filter_fn`` on it (its decision counted in
        ``filtered``): the reason to reject it, or None to train it (``RolloutBuffer`` calls this
        once it will grow no more). A user function that raises (or answers NaN) rejects the
        group with its error as the reason."""
        try:
            self.set_advantages(group)
            finite = finite_values(group.advantages_G)
        except Exception as exc:
            return _rejection(f"advantage {self.cfg.advantage!r}", exc, group)
        if not finite:
            return f"advantage is not finite for {len(group.members)} sample(s)"
        if self.filter_fn is None:
            return None
        try:
            keep = filter_keeps(self.filter_fn(group))
        except Exception as exc:
            return _rejection("dynamic_filter_fn", exc, group)
        self.filtered["kept" if keep else "rejected"] += 1
        if not keep:
            self.filtered["rejected_samples"] += len(group.members)
            self.filtered["rejected_reward"] += float(group.rewards_G.sum())
        return None if keep else FILTER_REASON

    def set_advantages(self, group: Group) -> None:
        """The group's ``advantages_G``; with ``advantage = "igpo"`` also its per-token advantages,
        from the current policy's probabilities of each sample's answer after each of its turns
        (trainer/igpo.py; docs/design.md §15.84 Per-token advantages: a turn's tokens carry its advantage)."""
        if self.advantage_fn is not None:
            group.advantages_G = self.advantage_fn(group.rewards_G)
            return
        group.advantages_G, group.token_advantages = igpo_advantages(
            group.samples, self.model, gamma=self.cfg.igpo_gamma, pad_id=self.pad_id, device=self.device,
            temperature=self.cfg.temperature, precision=self.precision,
            normalization=self.cfg.igpo_normalization, ig_weight=self.cfg.igpo_ig_weight)

    def optimize(self, groups: list[Group], lr: float | None = None,
                 streamed: StreamingStep | None = None) -> dict[str, float]:
        """One policy update on the groups' samples and advantages (or the rest of ``streamed``'s);
        ``lr`` = the schedule's unless given (a replayed step passes the one it recorded)."""
        if lr is None:
            lr = self.cfg.learning_rate * lr_multiplier(self.step, schedule=self.cfg.lr_schedule,
                                                        warmup_steps=self.cfg.lr_warmup_steps,
                                                        total_steps=self.cfg.max_steps)
        # the other ranks: the same step on the same batch (a streamed one has it already)
        self.channel.send(OPTIMIZE, None if streamed is not None else groups, lr, streamed is not None)
        return self.update(groups, lr, streamed)

    def update(self, groups: list[Group] | None, lr: float, streamed: StreamingStep | None) -> dict[str, float]:
        """The policy update itself, on every rank (each its share; ``ranks``)."""
        if streamed is not None:
            train_metrics = streamed.finish(lr) | streamed.perf()
        else:
            samples = [s for g in groups for s in g.samples]
            batch = collate(samples, torch.cat([g.advantages_G for g in groups]), self.pad_id, self.device,
                            token_advantages_of(groups))
            with failpoints.hang_before_backward(self.model, self.step + 1, self.ranks.rank):  # the hang test
                train_metrics = policy_update(self.model, self.optimizer, batch, cfg=self.cfg, lr=lr,
                                              ref_model=self.ref_model, precision=self.precision, ranks=self.ranks)
        self.step, self.version = self.step + 1, self.version + 1
        return train_metrics

    def sync_weights(self) -> Pending:
        """This version's weights directory, written, sealed and (once ``committed``) published
        beside the next step (docs/design.md §15.79 Weights are written beside the next step)."""
        t0 = time.monotonic()
        self.perf.weights_sealed(self.weight_sync.wait())  # the previous version, if still being written
        self.channel.send(WEIGHTS, self.version)  # every rank takes part in the gather
        with self.precision.published():  # in the dtype the base model was stored in
            pending = self.weight_sync.start(self.model, self.tokenizer, self.version)
        self.perf.weights_written(time.monotonic() - t0)
        return pending

    def write_weights(self) -> WeightsPublished:
        """This version's weights directory, written now (resume's publish, a replay's final weights)."""
        self.lease.confirm()  # the directory of a version that another trainer may have published
        t0 = time.monotonic()
        self.channel.send(WRITE_WEIGHTS, self.version)
        written = self.gather_weights(self.version)
        self.perf.weights_written(time.monotonic() - t0)
        return written

    def gather_weights(self, version: int) -> WeightsPublished | None:
        """``weights/v<version>`` written now: every rank gathers, rank 0 writes (None elsewhere)."""
        with self.precision.published():  # in the dtype the base model was stored in
            return self.weight_sync.write_now(self.model, self.tokenizer, version)

    def live_run(self, wait_time: float, groups: list[Group], compute_began: float) -> LiveRun:
        stats = bus.rollout_stats(self.r, self.cfg.run_id)
        rejected, stale = self.rejections.totals()
        return LiveRun(wait_time=wait_time, rejected_groups=rejected, worker_counts=stats,
                       perf=self.perf.line(groups, wait_time, compute_began, self.state, stats),
                       filter_kept=self.filtered["kept"], filter_rejected=self.filtered["rejected"],
                       filter_rejected_samples=self.filtered["rejected_samples"],
                       filter_rejected_reward=self.filtered["rejected_reward"],
                       stale_dropped=self.buffer.stale_in_batch, stale_dropped_total=stale)

    def log_metrics(self, line: dict[str, float]) -> None:
        self.metrics.write(line)
        if self.wandb is not None:
            self.wandb.log(line)

    def follow_events(self) -> list[bus.Entry]:
        entries, self.cursor = bus.read_events(self.r, self.cfg.run_id, self.cursor)
        for event_id, msg in entries:
            self.state.apply(msg)
            if isinstance(msg, StepCommitted):
                self.last_commit_id = event_id
        return entries

    def follow_and_watch(self) -> list[bus.Entry]:
        """The buffer's fold between reads; it stops a trainer that lost its lease, or whose
        Redis lost events it had folded (``lease.RollbackWatch``: restart, resume rebuilds)."""
        self.lease.check()
        before = self.cursor
        entries = self.follow_events()
        self.rollback.check(before)
        return entries

    # ----------------------------------------------------------------- resume
    def resume(self) -> None:
        """The newest checkpoint the events agree with; every step committed after it,
        replayed; the weights published if they never were; metrics.jsonl rebuilt from the
        events (they are the record); then the pending entries, back in the buffer. Only with
        the run's trainer lease (``run`` waits for it; here it is taken or refused)."""
        self.lease.hold()
        snap = snapshot_checkpoint(self.run_dir, self.r, self.cfg.run_id)  # fold only the events after it
        if snap is not None:
            vars(self.state).update(vars(snap.state))  # in place: the buffer shares this state
            self.cursor, self.last_commit_id = snap.cursor, snap.commit_id
        history = [(i, m) for i, m in self.follow_events() if isinstance(m, (StepCommitted, Evaluated))]
        self.retention.start(self.state.steps)
        found = (snap.path, read_state(snap.path)) if snap is not None else usable_checkpoint(
            self.run_dir, {m.step: i for i, m in history if isinstance(m, StepCommitted)})
        if found is not None:
            self.channel.send(LOAD, found[0])  # every rank loads its shards (at whatever world size wrote them)
            self.load_train_state(found[0])
            log.info("resuming from %s (step %d)", found[0], self.step)
        for _, record in history:
            if isinstance(record, StepCommitted) and record.step > self.step:
                # On exactly the samples it names, in the same order, with the learning rate it
                # recorded (the schedule depends on max_steps, which users raise to extend a run).
                groups = committed_groups(self.r, self.cfg.run_id, record, self.set_advantages, self.retention.archive)
                train_metrics = self.optimize(groups, lr=record.metrics.get("train/lr"))
                check_replayed(record, train_metrics, self.step, self.version)
        if self.step != self.state.steps:
            raise RlstreamError(f"events record {self.state.steps} steps but replay reached {self.step}")
        if self.step:
            log.info("replayed to step %d v%d", self.step, self.version)
        sync_committed_record(self.r, self.cfg.run_id, self.step, self.last_commit_id, self.lease)
        if must_publish(self.state, self.version, self.cfg.weight_sync_interval):
            publish(self.r, self.cfg.run_id, self.write_weights(), self.lease)
        rebuild_metrics(self.metrics, snap, history, lambda: [(i, m) for i, m in bus.iter_all_events(
            self.r, self.cfg.run_id) if isinstance(m, (StepCommitted, Evaluated))])
        self.buffer.restore()

    # ----------------------------------------------------------------- evaluate, checkpoint, finish
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
            try:
                metrics = run_evaluation(self.evaluation_fn, ctx)
            except Exception as exc:  # recorded as failed (not retried on this version); training goes on
                log.error("evaluation of v%d failed, training goes on: %s", self.version,
                          hook_failed("evaluation_fn", exc), exc_info=exc)
                metrics = {EVAL_FAILED: 1.0}
        fenced_write(self.r, self.lease, add=(keys.events(self.cfg.run_id), Evaluated(
            step=self.step, version=self.version, metrics=metrics)))
        self.state.last_evaluated = self.version
        self.log_metrics(eval_metrics(self.step, self.version, metrics))

    def checkpoint(self) -> None:
        """Save the train state after this step's commit, then archive and trim what it covers."""
        saved = not holds_commit(checkpoint_dir(self.run_dir, self.step), self.last_commit_id)  # else saved already
        if saved:
            self.follow_events()  # the fold recorded with it then includes this step's own commit
            fold = fold_record(self.state, self.cursor, self.last_commit_id, self.step, self.metrics)
            state = CheckpointState(self.step, self.version, self.last_commit_id, len(self.state.rows_admitted),
                                    self.base_fingerprint)
            self.channel.send(CHECKPOINT, state)  # every rank writes its shards
            self.save_train_state(state, fold)
        self.retention.after_checkpoint(self.step, saved)

    def save_train_state(self, state: CheckpointState, fold: str | None) -> None:
        """The checkpoint of ``state`` (every rank; ``fold`` is rank 0's to write)."""
        save_checkpoint(self.run_dir, state, self.model, self.tokenizer, self.optimizer, fold=fold)

    def load_train_state(self, path: Path) -> CheckpointState:
        """The checkpoint at ``path`` loaded in place (every rank: its shards)."""
        restored = load_checkpoint(path, self.model, self.optimizer, self.device, self.base_fingerprint)
        self.step, self.version = restored.step, restored.version
        return restored

    def save_outputs(self) -> None:
        """The final checkpoint (``save_final_checkpoint``) and the exported model (``output_model_id``)."""
        if self.cfg.save_final_checkpoint and self.step > 0:
            self.checkpoint()
        if self.cfg.output_model_id:
            self.channel.send(EXPORT)
            log.info("exported %s", self.export())

    def export(self) -> Path:
        """``models/<output_model_id>/`` (every rank gathers; rank 0 writes)."""
        with self.precision.published():
            return export_model(self.model, self.tokenizer, self.run_dir, self.cfg.output_model_id)

    def finish_wandb(self) -> None:
        """Finish the wandb run (its last lines uploaded), once."""
        if self.wandb is not None:
            wandb, self.wandb = self.wandb, None
            wandb.finish()

    def finish(self, reason: str, failed: bool = False) -> None:
        self.lease.confirm()  # a trainer that lost the lease must not export or checkpoint over its successor
        self.perf.weights_sealed(self.weight_sync.wait())  # the last version published before RunFinished
        self.evaluate()  # the final weights (skipped when this version was just evaluated)
        self.finish_wandb()
        self.save_outputs()
        finished = RunFinished(reason=reason, step=self.step, version=self.version, failed=failed)
        fenced_write(self.r, self.lease, add=(keys.events(self.cfg.run_id), finished))
        self.state.apply(finished)
        (log.error if failed else log.info)("trainer: run finished (%s) at step %d", reason, self.step)


YOUNG_THRESHOLD = 10_000  # allocations between young collections while the steps run (Python's default: 700)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """The steps run with every object alive before them (torch, transformers, the model and
    its modules: ~390k on the built-in task) out of the garbage collector's scans
    (``gc.freeze``): the full collections that the steps' allocations (samples, groups) set off
    every ~25 steps would otherwise walk them all, ~190 ms each (docs/design.md §15.89 Weights link
    their unchanged files; the steps run on a frozen heap). And a young collection every
    ``YOUNG_THRESHOLD`` allocations, not 700: a step allocates a few thousand objects that live
    until its batch is trained (the samples), which the default scanned several times a step
    and promoted into ever more frequent full collections. Objects freed by reference count go
    as before; garbage cycles among the frozen ones wait until the end, when they are handed
    back to the collector (``gc.unfreeze``) and the thresholds restored."""
    if gc.get_freeze_count():
        # frozen already (an enclosing trainer in this process, or the user's own gc.freeze()):
        # nothing to add, and unfreezing at the end would undo what the enclosing one froze
        yield
        return
    thresholds = gc.get_threshold()
    gc.collect()  # the garbage cycles already unreachable (resume's, evaluate's) go now: frozen, they stay to the end
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _rejection(name: str, exc: Exception, group: Group) -> str:
    reason = hook_failed(name, exc)
    log.warning("rejecting group %s: %s", group.group_id, reason)
    log.debug("%s traceback", name, exc_info=exc)  # one per group could flood the log at WARNING
    return reason
