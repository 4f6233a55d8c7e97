"""A group whose rejection lands before its samples (the reverse order of docs/design.md §15.98 A
written group is the trainer's to settle): a later run of its job, or the producer, rejects it
before an earlier run writes it. That rejection stands, so the fold settles the group and frees
its gate slots; the trainer must then not train it even when its samples complete in the buffer
before it folds the rejection. Its entries are acked untrained, the batch is filled from other
groups and ``rlstream audit`` finds no ``rejected_after_training``. On fakeredis."""
from __future__ import annotations

import pytest
from factories import config, sample

from rlstream.core import bus, keys
from rlstream.core.messages import GroupAdmitted, GroupRejected, GroupSampled, group_id_for
from rlstream.ops.audit import collect_audit
from rlstream.trainer import buffer
from rlstream.trainer.trainer import Trainer

RUN = "bs"
pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group


def admit(r, row: int) -> str:
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0, submit_version=0,
                                                group_size=2))
    return gid


def written(r, row: int, members: int = 2) -> None:
    """What a worker's MULTI writes: the group's samples, then GroupSampled."""
    for m in range(members):
        bus.xadd(r, keys.rollouts(RUN), sample(row, m))
    bus.xadd(r, keys.events(RUN), GroupSampled(group_id=group_id_for(0, row, 0), samples=members, worker_id="w1",
                                               version=0))


def rejected_first(r, row: int) -> None:
    """A later run of the row's job failed and rejected the group before the earlier run wrote it."""
    bus.xadd(r, keys.events(RUN), GroupRejected(group_id=group_id_for(0, row, 0), reason="draws failed", by="w2"))
    written(r, row)


def trainer(r, tmp_path, **over) -> Trainer:
    cfg = config(tmp_path, run_id=RUN, max_head_offpolicy_versions=0, **over)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    return t


def pending(r) -> int:
    return r.xpending(keys.rollouts(RUN), keys.TRAINER_GROUP)["pending"]


def assert_audit_clean(r, trained: list[str], rejected: str) -> None:
    report = collect_audit(r, RUN)
    assert report.rejected_after_training == [] and report.ok, report.lines()
    assert (report.trained, report.rejected, report.rejected_reasons) == (len(trained), 1, {"draws failed": 1})
    assert pending(r) == 0  # every entry trained once or acked untrained


def test_a_group_rejected_before_it_was_written_is_not_trained_and_the_batch_takes_another(r, tmp_path):
    stood, good = admit(r, 0), admit(r, 1)
    t = trainer(r, tmp_path)
    rejected_first(r, 0)  # complete in the buffer at the same read that folds its rejection
    written(r, 1)
    groups, _ = t.gather(1)
    assert stood in t.state.rejected and t.state.reserved_samples == 2  # the rejection stands: slots freed
    assert [g.group_id for g in groups] == [good]  # the oldest ready group was settled: the next one instead
    assert t.buffer.ready == [] and pending(r) == 2  # its entries acked; the batch's wait for the commit
    t.train_step(groups, wait_time=0.0)
    t.buffer.collect()
    assert t.state.trained == {good} and t.state.open_groups == []
    assert_audit_clean(r, [good], stood)


def test_a_streamed_step_skips_a_group_rejected_before_it_was_written(r, tmp_path):
    stood, good = admit(r, 0), admit(r, 1)
    t = trainer(r, tmp_path)
    rejected_first(r, 0)
    written(r, 1)
    chunks: list[list[str]] = []
    groups = t.buffer.stream(1, t.version, lambda gs: chunks.append([g.group_id for g in gs]))
    assert chunks == [[good]] and [g.group_id for g in groups] == [good]  # never handed to a forward
    t.train_step(groups, wait_time=0.0)
    assert_audit_clean(r, [good], stood)


def test_a_group_rejected_and_written_while_the_trainer_resumed_is_not_trained(r, tmp_path):
    """Both written after the resume's fold and delivered to the trainer's consumer before its read
    of the pending list (by a predecessor that lost the lease: reads are not fenced, docs/design.md
    §16 Known gaps): that read too is followed by a fold, as every read is, before a group is handed
    out."""
    stood = admit(r, 0)
    cfg = config(tmp_path, run_id=RUN, max_head_offpolicy_versions=0)
    t = Trainer(cfg, r, cfg.run_dir())
    restore = t.buffer.restore

    def written_meanwhile() -> None:
        rejected_first(r, 0)
        r.xreadgroup(keys.TRAINER_GROUP, buffer.CONSUMER, {keys.rollouts(RUN): ">"})  # now pending
        restore()

    t.buffer.restore = written_meanwhile
    t.resume()
    chunks: list[list[str]] = []
    good = admit(r, 1)
    written(r, 1)
    groups = t.buffer.stream(1, t.version, lambda gs: chunks.append([g.group_id for g in gs]))
    assert chunks == [[good]]
    t.train_step(groups, wait_time=0.0)
    assert_audit_clean(r, [good], stood)


def test_a_partial_group_rejected_while_it_waited_is_not_trained_when_given_up_on(r, tmp_path):
    """One member of two here (min_group_size 1), the producer's rejection folded meanwhile: once the
    buffer stops waiting for the other member, the group is settled already and is not scored or
    trained (nor rejected again)."""
    gid = admit(r, 0)
    t = trainer(r, tmp_path, min_group_size=1, job_timeout=5)
    bus.xadd(r, keys.rollouts(RUN), sample(0, 0))
    t.buffer.collect()
    bus.xadd(r, keys.events(RUN), GroupRejected(group_id=gid, reason="draws failed", by="producer"))
    t.buffer.collect()
    t.buffer.assembler.open[gid].first_seen -= 11  # past 2 x job_timeout (the assembler's own clock)
    scored: list[str] = []
    t.buffer.score = lambda group: scored.append(group.group_id)  # the callback, recorded (None: keep it)
    t.buffer.collect()
    assert scored == [] and t.buffer.ready == [] and gid not in t.buffer.assembler.open
    assert pending(r) == 0
    assert sum(isinstance(m, GroupRejected) for _, m in bus.iter_all_events(r, RUN)) == 1
