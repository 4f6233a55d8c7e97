"""``rlstream replay SOURCE CONFIG``: train a fresh model on a recorded run's rollouts.

Every ``StepCommitted`` of the source run names the exact rollouts-stream entries it trained
on, in order, and the stream or the run's archive keeps them (docs/design.md §15.45
Archive, then trim). Replay walks those steps
and runs one optimizer step per recorded step on the very same samples, with CONFIG's
algorithm: another ``policy_loss``, ``kl_beta``, ``advantage``, learning rate, or base model
(same tokenizer). It is the trainer's resume path (docs/design.md §8 Resume and replay;
``trainer/resume.py``) pointed at another run, and each step is the trainer's own
(``Trainer.optimize``, ``step_metrics``) without the stream around it. With the source
run's own config it reproduces that run's training step for step (the e2e test checks the
losses).

The source run is only read. The replay's outputs are files in its own run directory:
``config.json``, ``replay.json`` (the source run and step count), ``metrics.jsonl``
(``replay/source_step`` on each line), ``weights/v<N>/``, checkpoints and
``models/<output_model_id>/``. No sampling happens, so ``evaluation_fn`` and
``dynamic_filter_fn`` are not run; groups are trained as recorded.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import redis

from rlstream.core import bus
from rlstream.core.archive import Archive
from rlstream.core.config import Config
from rlstream.core.credentials import private_dir
from rlstream.core.errors import ConfigError
from rlstream.core.messages import StepCommitted
from rlstream.trainer.rank_protocol import STOP
from rlstream.trainer.ranks import close
from rlstream.trainer.resume import committed_groups
from rlstream.trainer.schedule import due
from rlstream.trainer.step_metrics import step_metrics
from rlstream.trainer.trainer import Trainer, frozen_heap

log = logging.getLogger(__name__)


def recorded_steps(r: redis.Redis, run_id: str) -> list[StepCommitted]:
    steps = [m for _, m in bus.iter_all_events(r, run_id) if isinstance(m, StepCommitted)]
    if not steps:
        raise ConfigError(f"run {run_id} has no committed step to replay")
    return steps


def replay_run(cfg: Config, source: redis.Redis, source_run_id: str, source_dir: Path | None = None,
               source_cfg: Config | None = None) -> int:
    """Train ``cfg``'s model on ``source_run_id``'s committed steps; return the steps run.
    ``source_dir``: the source run's directory, whose archive holds the rollouts trimmed
    from its stream (default: beside the replay's, under the same ``log_path``). ``source_cfg``:
    the source's config; when ``cfg`` has its schedule, each step takes the learning rate the
    source recorded (scaled by the ratio of the two ``learning_rate``s): the source's schedule
    ran over its own ``max_steps``, which a source that ended early (data exhausted), was
    extended, or is replayed in part did not reach."""
    archive = Archive(source_dir if source_dir is not None else cfg.run_dir().parent / source_run_id, source_run_id)
    if cfg.run_id == source_run_id:
        raise ConfigError(f"replay needs a new run id (--run-id), not the source's {source_run_id!r}")
    steps = recorded_steps(source, source_run_id)
    steps = steps[:cfg.max_steps] if cfg.max_steps else steps
    cfg = cfg.model_copy(update={"max_steps": len(steps)})  # the LR schedule spans the replay
    run_dir = cfg.run_dir()
    private_dir(run_dir)  # owner-only (0700), as `rlstream up` makes it
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    (run_dir / "replay.json").write_text(json.dumps({"source_run": source_run_id, "steps": len(steps)}))
    t = Trainer(cfg, source, run_dir)  # several ranks: this is rank 0, the others follow_replay
    try:
        t.metrics.path.write_text("")
        log.info("replaying %d steps of run %s into %s", len(steps), source_run_id, run_dir)
        # as a live trainer's steps (docs/design.md §15.89 Weights link their unchanged files; the steps run on a frozen
        # heap); the other ranks follow on one too
        with frozen_heap():
            for committed in steps:
                t0 = time.monotonic()
                groups = committed_groups(source, source_run_id, committed, t.set_advantages, archive)
                train_metrics = t.optimize(groups, lr=recorded_lr(committed, cfg, source_cfg))
                metrics = step_metrics(t.step, t.version, groups, train_metrics, train_time=time.monotonic() - t0)
                t.metrics.write({**metrics, "replay/source_step": committed.step})
                if due(cfg.dcp_save_interval, t.step):
                    t.checkpoint()
                log.info("replay step %d (source step %d) loss %.4f", t.step, committed.step, metrics["train/loss"])
        t.write_weights()  # written, never published: a replay writes no events
        t.save_outputs()
    finally:
        t.finish_wandb()  # its last lines uploaded, however the replay ends (a rank ends without atexit)
    t.channel.send(STOP)
    close(t.ranks)
    return t.step


def recorded_lr(committed: StepCommitted, cfg: Config, source_cfg: Config | None) -> float | None:
    """The learning rate of a replayed step: the source's recorded one when ``cfg`` has the source's
    schedule (scaled to ``cfg.learning_rate``), else None (the schedule's over the replay)."""
    lr = committed.metrics.get("train/lr")
    if lr is None or source_cfg is None or (cfg.lr_schedule, cfg.lr_warmup_steps) != (
            source_cfg.lr_schedule, source_cfg.lr_warmup_steps):
        return None
    return lr if cfg.learning_rate == source_cfg.learning_rate else lr * cfg.learning_rate / source_cfg.learning_rate


def follow_replay(cfg: Config) -> int:
    """A rank other than 0 of a replay: the same steps, on the batches rank 0 reads and sends
    (docs/design.md §15.82 Rank 0 speaks for the trainer's ranks)."""
    t = Trainer(cfg, None, cfg.run_dir())
    steps = t.run()
    close(t.ranks)
    return steps
