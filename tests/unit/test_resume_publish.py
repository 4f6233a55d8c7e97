"""Resume publishes a due version a crash left unpublished: the crash came after a later, unsynced step's
commit, before the previous synced version's publish (docs/design.md §8 Resume and replay, item 5)."""
from __future__ import annotations

from functools import partial

import factories
import pytest

from rlstream.core import bus, keys
from rlstream.core.messages import GroupAdmitted, WeightsPublished, group_id_for
from rlstream.producers.gate import staleness_capacity
from rlstream.trainer import weight_sync
from rlstream.trainer.trainer import Trainer

RUN = "hp"
pytestmark = pytest.mark.usefixtures("r_group")
# weight_sync_interval 2 <= O + 1 = 3: allowed; the gate admits (v + 3) batches at published v
config = partial(factories.config, run_id=RUN, max_steps=10, max_head_offpolicy_versions=2, weight_sync_interval=2,
                 prompt_groups_per_step=1, completions_per_prompt=2)


def add_group(r, row: int) -> None:
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0, submit_version=0,
                                                group_size=2))
    for m in range(2):
        bus.xadd(r, keys.rollouts(RUN), factories.sample(row, m))


def published(r) -> list[int]:
    return [m.version for _, m in bus.iter_all_events(r, RUN) if isinstance(m, WeightsPublished)]


def test_a_synced_version_unpublished_when_a_later_step_committed_is_published_by_resume(r, tmp_path, monkeypatch):
    cfg = config(tmp_path)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()  # publishes v0
    for row in range(3):  # what the gate admits at v0: (0 + O + 1) batches
        add_group(r, row)
    while len(t.buffer.ready) < 3:
        t.buffer.collect()
    t.train_step(t.buffer.take(1, t.version), wait_time=0.0)  # v1: not due
    monkeypatch.setattr(weight_sync.Pending, "run", lambda self: None)  # v2's write is slow: the process dies first
    t.train_step(t.buffer.take(1, t.version), wait_time=0.0)  # v2: due, written beside step 3
    t.train_step(t.buffer.take(1, t.version), wait_time=0.0)  # v3: not due, so it does not wait for v2
    assert t.step == 3 and published(r) == [0]
    monkeypatch.undo()
    t.lease.release()  # (the crash: its lease would lapse after its TTL)

    again = Trainer(cfg, r, cfg.run_dir())
    again.resume()
    # Every admitted group is trained; the gate admits more only once a version past v0 is published.
    assert staleness_capacity(max(published(r)), 2, 2, 3 * 2) >= 2, (
        f"published {published(r)} after resume at step {again.step}: the gate admits nothing more, and the "
        "trainer waits for groups forever")

