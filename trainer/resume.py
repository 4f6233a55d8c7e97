"""Resume (DESIGN.md section 5): rebuild the exact state of a crashed trainer from the
newest checkpoint the events stream agrees with, a replay of every ``StepCommitted`` after
it on the very samples it names, then this consumer's pending entries.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

from rlstream.core import keys
from rlstream.core.codec import decode
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import Evaluated, RolloutSample, StepCommitted
from rlstream.trainer import buffer
from rlstream.trainer.batch import Group
from rlstream.trainer.checkpoint import CheckpointState, complete_checkpoints, load_checkpoint, read_state
from rlstream.trainer.commit import publish, sync_committed_step
from rlstream.trainer.policy_model import publish_weights

if TYPE_CHECKING:
    from rlstream.trainer.trainer import Trainer

log = logging.getLogger(__name__)
LOSS_REL_TOL = 1e-3


def usable_checkpoint(run_dir: Path, commits: dict[int, str]) -> tuple[Path, CheckpointState] | None:
    """The newest complete checkpoint whose step the events stream records, by the very
    ``StepCommitted`` event it saved (``commits``: step -> event id). Checkpoints are
    fsynced but Redis's AOF (``everysec``) can lose its last second in an OS crash, so a
    checkpoint may be ahead of the events, or of a step re-committed since."""
    for path in complete_checkpoints(run_dir):
        try:
            state = read_state(path)
        except (OSError, ValueError, TypeError) as exc:  # sealed, but not a state this build reads
            log.warning("skipping checkpoint %s: unreadable state.json (%s)", path, exc)
            continue
        if state.step == 0 or commits.get(state.step) == state.events_cursor:
            return path, state
        why = (f"the events stream records only {len(commits)} step(s)" if state.step not in commits else
               f"step {state.step} is now event {commits[state.step]}, not the saved {state.events_cursor}")
        log.warning("skipping checkpoint %s: %s (Redis lost its last writes, e.g. an OS crash with appendfsync "
                    "everysec); trying an older one", path, why)
    return None


def loss_matches(replayed: float, recorded: float) -> bool:
    return math.isclose(replayed, recorded, rel_tol=LOSS_REL_TOL, abs_tol=1e-6)


def committed_groups(r, run_id: str, committed: StepCommitted, advantage_fn) -> list[Group]:
    """The groups a committed step trained, rebuilt from the very entries it names, in the
    same order, with advantages from ``advantage_fn``."""
    raw = buffer.fetch_entries(r, keys.rollouts(run_id), committed.entry_ids)
    missing = [e for e in committed.entry_ids if e not in raw]
    if missing:
        raise RlstreamError(f"cannot replay step {committed.step}: {len(missing)} of its samples are gone from "
                            "the rollouts stream (was it trimmed past the newest checkpoint?)")
    groups: dict[str, Group] = {gid: Group(gid, 0) for gid in committed.group_ids}
    for entry_id in committed.entry_ids:
        sample = decode(raw[entry_id], expect=RolloutSample)
        groups[sample.group_id].members[sample.sample_id] = (entry_id, sample)
    for group in groups.values():
        group.advantages_G = advantage_fn(group.rewards_G)
    return list(groups.values())


def replay(t: Trainer, committed: StepCommitted) -> None:
    """Re-run a committed step on exactly the samples it names, in the same order, with the
    learning rate it recorded (the schedule depends on max_steps, which users raise to
    extend a run)."""
    groups = committed_groups(t.r, t.cfg.run_id, committed, t.advantage_fn)
    metrics = t.optimize(groups, lr=committed.metrics.get("train/lr"))
    if (t.step, t.version) != (committed.step, committed.version):
        raise RlstreamError(f"replay diverged: at step {t.step} v{t.version}, event says "
                            f"step {committed.step} v{committed.version}")
    recorded = committed.metrics.get("train/loss")
    if recorded is not None and not loss_matches(metrics["train/loss"], recorded):
        log.warning("replay of step %d: loss %.6g, the original step recorded %.6g; the replayed weights may "
                    "differ from the crashed trainer's (changed config or code, or nondeterministic kernels?)",
                    committed.step, metrics["train/loss"], recorded)


def resume(t: Trainer) -> None:
    history = [(i, m) for i, m in t.follow_events() if isinstance(m, (StepCommitted, Evaluated))]
    found = usable_checkpoint(t.run_dir, {m.step: i for i, m in history if isinstance(m, StepCommitted)})
    if found is not None:
        restored = load_checkpoint(found[0], t.model, t.optimizer, t.device)
        t.step, t.version = restored.step, restored.version
        log.info("resuming from %s (step %d)", found[0], t.step)
    for _, committed in history:
        if isinstance(committed, StepCommitted) and committed.step > t.step:
            replay(t, committed)
    if t.step != t.state.steps:
        raise RlstreamError(f"events record {t.state.steps} steps but replay reached {t.step}")
    if t.step:
        log.info("replayed to step %d v%d", t.step, t.version)
    previous = sync_committed_step(t.r, t.cfg.run_id, t.step, t.last_commit_id)
    if previous > t.step:
        log.warning("%s says step %d was committed but the events stream ends at step %d: is another trainer "
                    "running for this run? The next commit will be refused", keys.committed_step(t.cfg.run_id),
                    previous, t.step)
    interval = t.cfg.weight_sync_interval
    if t.state.latest_weights is None or (
        interval and t.version % interval == 0 and t.state.published_version < t.version
    ):
        # Fresh run (v0), or a crash between commit and publish: publish now.
        publish(t.r, t.cfg.run_id, publish_weights(t.model, t.tokenizer, t.run_dir, t.version, t.cfg.keep_weights))
    t.metrics.path.write_text("")  # the events are the record: rebuild metrics.jsonl from them
    for _, event in history:
        t.metrics.write(event.metrics if isinstance(event, StepCommitted) else
                        {"step": event.step, "version": event.version, "eval/version": event.version,
                         **event.metrics})
    t.assembler.completed |= t.state.settled_groups
    t.add_samples(buffer.read_all_pending(t.r, t.cfg.run_id, t.consumer, count=512, vocab_size=t.vocab_size,
                                           max_seq_len=t.cfg.max_seq_len))
    # Members dead-lettered before the crash (or just now) still count towards settling their groups.
    t.add_invalid(list(buffer.dead_members(t.r, t.cfg.run_id)))
