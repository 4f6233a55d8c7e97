"""The weights written beside the next step (docs/design.md §15.79 Weights are written beside
the next step; trainer/weight_sync.py), on fakeredis with the built-in tiny model: a version
written in the background is the very directory ``save_pretrained`` writes (float32, stored as
bfloat16, LoRA merged); it is announced only once its step is committed and its directory is
sealed, in order, and the old versions are pruned after that; a step that is not committed
announces nothing; an error of the writer's thread stops the trainer at its next step; a crash
between a commit and its version's write is repaired by resume, also when a later unsynced step
committed first."""
from __future__ import annotations

import json
import threading
from functools import partial

import factories
import pytest
import torch

from rlstream.builtin.tiny_model import build_model, build_tokenizer
from rlstream.core import bus, keys, weights
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import GroupAdmitted, StepCommitted, WeightsPublished, group_id_for
from rlstream.producers.gate import staleness_capacity
from rlstream.trainer import weight_sync
from rlstream.trainer.policy_model import weights_dir, write_model_dir
from rlstream.trainer.trainer import Trainer

RUN = "ws"
pytestmark = pytest.mark.usefixtures("r_group")  # tests/unit/conftest.py: fakeredis with the trainer's group
config = partial(factories.config, run_id=RUN, max_steps=4, max_head_offpolicy_versions=3, keep_weights=2)


def add_group(r, row: int) -> None:
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0, submit_version=0,
                                                group_size=2))
    for m in range(2):
        bus.xadd(r, keys.rollouts(RUN), factories.sample(row, m))


def published(r) -> list[int]:
    return [m.version for _, m in bus.iter_all_events(r, RUN) if isinstance(m, WeightsPublished)]


def ready_trainer(r, tmp_path, groups: int = 1, **over) -> Trainer:
    """A trainer after resume (which published v0 synchronously: the template), ``groups`` groups ready."""
    cfg = config(tmp_path, **over)
    t = Trainer(cfg, r, cfg.run_dir())
    t.resume()
    for row in range(groups):
        add_group(r, row)
    while len(t.buffer.ready) < groups:
        t.buffer.collect()
    return t


def step(t: Trainer) -> dict[str, float]:
    return t.train_step(t.buffer.take(1, t.version), wait_time=0.0)


def bfloat16_base(tmp_path):
    directory = tmp_path / "bf16-base"
    weights.write_model_dir(directory, build_model(0).to(torch.bfloat16), build_tokenizer(), version=0)
    return {"base_model": str(directory)}


@pytest.mark.parametrize("variant", ["float32", "stored in bfloat16", "lora"])
def test_a_version_written_in_the_background_is_the_directory_save_pretrained_writes(r, tmp_path, variant):
    over = {"float32": {}, "stored in bfloat16": bfloat16_base(tmp_path), "lora": {"lora_rank": 4}}[variant]
    t = ready_trainer(r, tmp_path, **over)
    assert t.weight_sync.template is not None  # resume wrote v0 with save_pretrained and checked the snapshot
    step(t)  # v1, written in the background
    with t.precision.published():
        expected = write_model_dir(tmp_path / "by-save-pretrained", t.model, t.tokenizer, version=1)
    t.weight_sync.wait()
    assert weights.directory_digest(weights_dir(t.run_dir, 1))[:2] == expected
    assert published(r)[-1] == 1 and next(m for _, m in bus.iter_all_events(r, RUN)
                                          if isinstance(m, WeightsPublished) and m.version == 1).sha256 == expected[0]


def test_a_version_is_announced_once_committed_and_sealed_in_order_and_pruned_after(r, tmp_path, monkeypatch):
    t = ready_trainer(r, tmp_path, groups=3)
    sealed = {1: threading.Event(), 3: threading.Event()}  # v1's and v3's directories: sealed when the test says so
    real_write = t.weight_sync.write

    def slow_write(weights_file, version):
        if version in sealed:
            assert sealed[version].wait(10)
        return real_write(weights_file, version)

    monkeypatch.setattr(t.weight_sync, "write", slow_write)
    step(t)
    steps = [m.step for _, m in bus.iter_all_events(r, RUN) if isinstance(m, StepCommitted)]
    assert steps == [1] and published(r) == [0]  # committed, not announced: v1 is not sealed yet
    assert not (weights_dir(t.run_dir, 1) / weights.MANIFEST).exists()
    sealed[1].set()
    for _ in range(2):
        step(t)  # each step waits for the version before it
    assert published(r) == [0, 1, 2]  # v3 committed, not sealed (before, a quick v3 could be announced already)
    sealed[3].set()
    t.weight_sync.wait()
    assert published(r) == [0, 1, 2, 3]
    assert sorted(p.name for p in (t.run_dir / "weights").iterdir()) == ["v0", "v2", "v3"]  # keep_weights = 2, and v0


def test_a_step_that_is_not_committed_announces_nothing(r, tmp_path):
    t = ready_trainer(r, tmp_path)
    r.set(keys.trainer_lease(RUN), "usurper")
    with pytest.raises(RlstreamError, match="commit of step 1 refused"):
        step(t)
    assert t.weight_sync.pending is not None and t.weight_sync.pending.released.is_set()  # cancelled
    t.weight_sync.close()  # finishes the write; never announces it
    assert published(r) == [0]


def test_an_error_on_the_writers_thread_stops_the_trainer_at_its_next_step(r, tmp_path, monkeypatch):
    t = ready_trainer(r, tmp_path, groups=2)

    def refused(*_, **__):
        raise RlstreamError("the disk is full")

    monkeypatch.setattr(weight_sync.weights, "write_linked_dir", refused)
    step(t)  # committed; v1's write fails on the writer's thread
    with pytest.raises(RlstreamError, match="the disk is full"):
        step(t)  # raised before step 2 commits anything
    assert [m.step for _, m in bus.iter_all_events(r, RUN) if isinstance(m, StepCommitted)] == [1]
    assert published(r) == [0]


def test_a_crash_between_the_commit_and_the_write_is_repaired_by_resume(r, tmp_path, monkeypatch):
    t = ready_trainer(r, tmp_path)
    monkeypatch.setattr(weight_sync.Pending, "run", lambda self: None)  # the process dies before the writer runs
    step(t)
    assert published(r) == [0] and not weights_dir(t.run_dir, 1).exists()
    t.lease.release()
    again = Trainer(t.cfg, r, t.run_dir)
    again.resume()  # replays step 1, then writes and publishes v1 (docs/design.md §8 Resume and replay)
    assert published(r) == [0, 1] and (weights_dir(t.run_dir, 1) / weights.MANIFEST).is_file()
    last = [m for _, m in bus.iter_all_events(r, RUN) if isinstance(m, WeightsPublished)][-1]
    assert weights.directory_digest(weights_dir(t.run_dir, 1))[0] == last.sha256
    assert all(torch.equal(a, b) for a, b in zip(t.model.parameters(), again.model.parameters()))  # the same v1


def test_a_model_whose_directory_cannot_be_reproduced_is_written_on_the_steps_thread(r, tmp_path, monkeypatch):
    monkeypatch.setattr(weight_sync, "dir_template", lambda directory, state: None)  # e.g. sharded weights
    t = ready_trainer(r, tmp_path)
    assert t.weight_sync.checked and t.weight_sync.template is None
    step(t)
    assert (weights_dir(t.run_dir, 1) / weights.MANIFEST).is_file()  # written before train_step returned
    t.weight_sync.wait()
    assert published(r) == [0, 1]


def test_the_template_is_refused_when_the_snapshot_is_not_the_file(tmp_path):
    model, tokenizer = build_model(0), build_tokenizer()
    directory = tmp_path / "v0"
    weights.write_model_dir(directory, model, tokenizer, version=0)
    state = weight_sync.state_of(model)
    template = weight_sync.dir_template(directory, state)
    assert template is not None and "model.safetensors" not in template.files and "config.json" in template.files
    other = {k: v + 1.0 for k, v in state.items()}  # not the weights the directory holds
    assert weight_sync.dir_template(directory, other) is None
    assert weight_sync.dir_template(directory, {}) is None  # a tensor the state does not have


def test_a_write_that_hangs_stops_the_step_within_its_bound(tmp_path, monkeypatch):
    from rlstream.core.errors import RlstreamError
    from rlstream.trainer import weight_sync

    monkeypatch.setattr(weight_sync, "WRITE_BOUND_S", 0.05)
    sync = weight_sync.WeightSync(None, "t", None, tmp_path, keep=2)
    sync.pending = weight_sync.Pending(3, write=lambda: None, announce=lambda written: None)
    sync.pending.committed()  # its step committed; the writer thread never finishes it (a hung disk)
    with pytest.raises(RlstreamError, match="v3: its write under .* did not finish within 0s"):
        sync.wait()


def inode(path) -> int:
    return path.stat().st_ino


def announced(r, version: int) -> WeightsPublished:
    return next(m for _, m in bus.iter_all_events(r, RUN) if isinstance(m, WeightsPublished) and m.version == version)


def test_a_versions_unchanged_files_are_links_to_the_previous_versions_and_it_verifies(r, tmp_path):
    """docs/design.md §15.89 Weights link their unchanged files; the steps run on a frozen heap: the
    template's files of v2
    are v1's (one inode), v1's are v0's; the weights file is each version's own; every version
    verifies against its announced digest, also once the versions it linked to are pruned."""
    t = ready_trainer(r, tmp_path, groups=4)
    names = sorted(t.weight_sync.template.files)
    assert names and "config.json" in names
    for _ in range(4):
        step(t)
    t.weight_sync.wait()
    v = [weights_dir(t.run_dir, n) for n in range(5)]
    assert sorted(p.name for p in (t.run_dir / "weights").iterdir()) == ["v0", "v3", "v4"]  # keep_weights = 2
    for name in names:
        assert inode(v[4] / name) == inode(v[3] / name) == inode(v[0] / name)  # v1 and v2, pruned, linked them
    assert inode(v[4] / weight_sync.WEIGHTS_FILE) != inode(v[3] / weight_sync.WEIGHTS_FILE)
    for n in (0, 3, 4):
        weights.verify(v[n], announced(r, n).sha256)
        manifest = json.loads((v[n] / weights.MANIFEST).read_text())
        assert (manifest["sha256"], manifest["bytes"], manifest["files"]) == weights.directory_digest(v[n])


def test_a_corrupted_linked_file_fails_verify_and_is_not_linked_again(r, tmp_path):
    t = ready_trainer(r, tmp_path, groups=3)
    step(t)
    t.weight_sync.wait()
    v1 = weights_dir(t.run_dir, 1)
    config_v1 = v1 / "config.json"
    assert config_v1.stat().st_nlink > 1  # v0's file, linked
    good = config_v1.read_bytes()
    config_v1.write_bytes(good.replace(b"}", b", \"x\": 1}", 1))  # in place: v0's, which is the same file, too
    for n in (0, 1):
        with pytest.raises(ValueError, match="does not match the published"):
            weights.verify(weights_dir(t.run_dir, n), announced(r, n).sha256)
    step(t)  # v2: its config.json written from the template's bytes, not linked to the changed file
    t.weight_sync.wait()
    v2 = weights_dir(t.run_dir, 2)
    assert (v2 / "config.json").read_bytes() == good and inode(v2 / "config.json") != inode(config_v1)
    weights.verify(v2, announced(r, 2).sha256)
    step(t)  # v3 links v2's again
    t.weight_sync.wait()
    assert inode(weights_dir(t.run_dir, 3) / "config.json") == inode(v2 / "config.json")


def test_a_filesystem_without_hard_links_gets_every_file_written(r, tmp_path, monkeypatch):
    import errno
    import os

    def refuse(*_):
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(os, "link", refuse)
    t = ready_trainer(r, tmp_path, groups=2)
    step(t)
    t.weight_sync.wait()
    assert not t.weight_sync.links  # not tried again
    step(t)
    t.weight_sync.wait()
    assert not t.weight_sync.links
    for n in (1, 2):
        weights.verify(weights_dir(t.run_dir, n), announced(r, n).sha256)
        assert (weights_dir(t.run_dir, n) / "config.json").stat().st_nlink == 1


def holding(tensors):
    return lambda: None if tensors else None


def test_a_versions_snapshot_is_let_go_once_written_while_its_pending_lives_on():
    """A Pending stays referenced (the step's frame, ``WeightSync.pending``, a garbage cycle through a caught
    exception's traceback, collected rarely on a frozen heap) after its write: the snapshot must not."""
    import weakref

    tensor = torch.zeros(4)
    ref = weakref.ref(tensor)
    pending = weight_sync.Pending(1, holding({"w": tensor}), lambda written: None)
    del tensor
    assert ref() is not None
    pending.committed()
    pending.run()
    assert pending.done.is_set() and pending.error is None and ref() is None


def test_the_links_names_are_fsynced_before_the_manifest_is_written(tmp_path, monkeypatch):
    """A linked file is not fsynced (its data was, when first written): the new directory's entries are, before
    the manifest that makes it complete, else a crash could leave a manifest naming a link that is not there."""
    same = {"config.json": weights.SameFile.of(b"{}"), "tokenizer.json": weights.SameFile.of(b"[]")}

    def fill(tmp):
        (tmp / "model.safetensors").write_bytes(b"weights")

    def whole(tmp):
        tmp.mkdir()
        for name, same_file in same.items():
            (tmp / name).write_bytes(same_file.data)
        fill(tmp)

    weights.write_dir(tmp_path / "v0", whole, version=0)
    known = weights.stamps(tmp_path / "v0", same)
    synced, real = [], weights.fsync_dir
    monkeypatch.setattr(weights, "fsync_dir", lambda d: synced.append((d.name, (d / weights.MANIFEST).exists()))
                        or real(d))
    digest, _, links = weights.write_linked_dir(tmp_path / "v1", fill, version=1, same=same, source=tmp_path / "v0",
                                                known=known)
    assert links and inode(tmp_path / "v1" / "config.json") == inode(tmp_path / "v0" / "config.json")
    assert (".tmp-v1", False) in synced  # the temp directory, while it had no manifest yet
    weights.verify(tmp_path / "v1", digest)


def test_a_fill_that_writes_a_shared_files_name_is_refused_before_any_link(tmp_path):
    """Its write would go through the link into every version sharing the file: refused, the source whole."""
    same = {"config.json": weights.SameFile.of(b"{}")}
    weights.write_dir(tmp_path / "v0", lambda tmp: (tmp.mkdir(), (tmp / "config.json").write_bytes(b"{}"),
                                                    (tmp / "model.safetensors").write_bytes(b"w")), version=0)
    known = weights.stamps(tmp_path / "v0", same)

    def fill(tmp):
        (tmp / "model.safetensors").write_bytes(b"weights")
        (tmp / "config.json").write_bytes(b'{"changed": true}')

    with pytest.raises(ValueError, match=r"fill wrote \['config.json'\]"):
        weights.write_linked_dir(tmp_path / "v1", fill, version=1, same=same, source=tmp_path / "v0", known=known)
    assert (tmp_path / "v0" / "config.json").read_bytes() == b"{}"


def test_a_fill_with_a_subdirectory_is_sealed_the_long_way_and_links_nothing_next(tmp_path):
    """``write_linked_dir`` writes flat directories; a ``fill`` that adds a subdirectory gets its
    directory sealed as ``write_dir`` seals one (every file fsynced and hashed, the same digest),
    and the stamps are dropped, so the next version writes its shared files afresh."""
    same = {"config.json": weights.SameFile.of(b"{}")}

    def whole(tmp, payload):
        tmp.mkdir()
        (tmp / "config.json").write_bytes(b"{}")
        with_sub(tmp, payload)

    def with_sub(tmp, payload=b"w1"):
        (tmp / "model.safetensors").write_bytes(payload)
        (tmp / "extra").mkdir()
        (tmp / "extra" / "a.bin").write_bytes(b"a")

    weights.write_dir(tmp_path / "v0", partial(whole, payload=b"w0"), version=0)
    known = weights.stamps(tmp_path / "v0", same)
    digest, size, links = weights.write_linked_dir(tmp_path / "v1", with_sub, version=1, same=same,
                                                   source=tmp_path / "v0", known=known)
    weights.verify(tmp_path / "v1", digest)
    assert (tmp_path / "v1" / "extra" / "a.bin").read_bytes() == b"a" and known == {} and links
    assert (digest, size) == weights.write_dir(tmp_path / "w1", partial(whole, payload=b"w1"), version=1)


def test_a_due_version_a_crash_left_unpublished_behind_a_later_commit_is_published_by_resume(r, tmp_path, monkeypatch):
    # weight_sync_interval 2 <= O + 1 = 3: a step that is not due commits without waiting for the previous
    # version's write, so a crash can fall after step 3's commit with v2 never announced. The gate admits
    # (v + O + 1) batches at published v: at v0 nothing more once the 3 admitted are trained
    # (docs/design.md §8 Resume and replay, item 5).
    over = {"weight_sync_interval": 2, "max_head_offpolicy_versions": 2, "max_steps": 10}
    t = ready_trainer(r, tmp_path, groups=3, **over)  # what the gate admits at v0
    step(t)  # v1: not due
    monkeypatch.setattr(weight_sync.Pending, "run", lambda self: None)  # v2's write is slow: the process dies first
    step(t)  # v2: due, written beside step 3
    step(t)  # v3: not due, so it does not wait for v2
    assert t.step == 3 and published(r) == [0]
    monkeypatch.undo()
    t.lease.release()  # (the crash: its lease would lapse after its TTL)

    cfg = config(tmp_path, **over)
    again = Trainer(cfg, r, cfg.run_dir())
    again.resume()
    assert staleness_capacity(max(published(r)), 2, 2, 3 * 2) >= 2, (
        f"published {published(r)} after resume at step {again.step}: the gate admits nothing more, and the "
        "trainer waits for groups forever")
