"""``rlstream audit`` and ``rlstream dead`` as subprocesses against a real redis-server:
a run directory in tmp_path whose config.json points at the session's server, events and
samples written under the test's run id."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import factories
import pytest
from factories import legacy_config, rlstream
from rq import Queue
from rq.serializers import JSONSerializer

from rlstream.core import bus, keys
from rlstream.core.bus import xrange_all
from rlstream.core.connection import connect
from rlstream.core.credentials import PASSWORD_ENV
from rlstream.core.embedded_redis import EmbeddedRedis
from rlstream.core.errors import RedisUnavailable
from rlstream.core.messages import GroupAdmitted, GroupRejected, StepCommitted, group_id_for, sample_id_for
from rlstream.ops.audit import collect_audit
from rlstream.trainer import reads

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def redis_password_in_env(monkeypatch, redis_server):
    """config.json holds no password: the CLI gets it the way a user gives it."""
    monkeypatch.setenv(PASSWORD_ENV, redis_server.password)
G = 2


def gid(row: int) -> str:
    return group_id_for(0, row, 0)


def admitted(row: int) -> GroupAdmitted:
    return GroupAdmitted(group_id=gid(row), row_index=row, epoch=0, attempt=0, submit_version=0, group_size=G)


sample = partial(factories.sample, group_size=G, worker_id="w0")


def sid(entry_id) -> str:
    return entry_id.decode() if isinstance(entry_id, bytes) else entry_id


def add_samples(r, run_id: str, row: int) -> list[str]:
    return [sid(bus.xadd(r, keys.rollouts(run_id), sample(row, m))) for m in range(G)]


def commit(r, run_id: str, step: int, rows: list[int], entry_ids: list[str]) -> None:
    bus.xadd(r, keys.events(run_id), StepCommitted(
        step=step, version=step, entry_ids=entry_ids, group_ids=[gid(row) for row in rows],
        sample_ids=[sample_id_for(gid(row), m) for row in rows for m in range(G)]))


def enqueue_job(r, run_id: str, row: int) -> None:
    queue = Queue(keys.job_queue_name(run_id), connection=r, serializer=JSONSerializer)
    queue.enqueue("rlstream.workers.jobs.run_group", {"group_id": gid(row)}, job_id=f"{run_id}-{gid(row)}")


def write_run_dir(path: Path, run_id: str, redis_url: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = legacy_config(run_id=run_id, redis={"url": redis_url})
    (path / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    return path


def fields(stdout: str) -> dict[str, str]:
    """``key: value`` lines -> dict (first occurrence of each key)."""
    out: dict[str, str] = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out.setdefault(key, value)
    return out


def write_clean_ledger(r, run_id: str) -> None:
    """Rows 0-1 trained in step 1, row 2 in step 2, row 3 rejected, row 4 in flight (its rq
    job exists), row 5 in flight (one sample in the stream), row 99 admitted without any
    trace (lost), one undecodable rollout, one dead letter."""
    events = keys.events(run_id)
    for row in range(6):
        bus.xadd(r, events, admitted(row))
    enqueue_job(r, run_id, 4)
    e01 = add_samples(r, run_id, 0) + add_samples(r, run_id, 1)
    commit(r, run_id, 1, [0, 1], e01)
    commit(r, run_id, 2, [2], add_samples(r, run_id, 2))
    bus.xadd(r, events, GroupRejected(group_id=gid(3), reason="rollout job failed: boom", by="producer"))
    bus.xadd(r, events, admitted(99))
    r.xadd(keys.rollouts(run_id), {bus.FIELD: b"\xc1junk"})
    bus.xadd(r, keys.rollouts(run_id), sample(5, 1))
    with r.pipeline(transaction=True) as pipe:
        reads.dead_letter(pipe, run_id, keys.rollouts(run_id), "1-1", "not msgpack:\nbad", b"\xc1")
        pipe.execute()


def test_audit_clean_ledger_exits_0(r, run_id, redis_url, tmp_path):
    write_clean_ledger(r, run_id)
    bus.xadd(r, keys.rollouts(run_id), sample(99, 0))  # a trace: row 99 is in flight, not lost
    run_dir = write_run_dir(tmp_path / "run", run_id, redis_url)
    proc = rlstream("audit", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    f = fields(proc.stdout)
    assert f["run"] == run_id
    assert f["groups_admitted"] == "7"
    assert f["groups_trained"] == "3"
    assert f["groups_rejected"] == "1"
    assert f["rejected_reason"] == "1  rollout job failed: boom"
    assert f["groups_in_flight"].startswith("3  (job=1 samples_only=2)")
    assert f["groups_lost"] == "0"
    assert f["trained_twice"] == "0"
    assert (f["steps"], f["first_step"], f["last_step"]) == ("2", "1", "2")
    assert (f["duplicate_steps"], f["missing_steps"]) == ("none", "none")
    assert f["samples_trained"] == "6"
    assert f["rollouts_undecodable"] == "1"
    assert f["dead_letters"] == "1"
    assert proc.stdout.splitlines()[-1] == "result: ok"


def test_audit_lost_group_exits_1(r, run_id, redis_url, tmp_path):
    write_clean_ledger(r, run_id)  # row 99: admitted, no job, no sample -> lost
    write_run_dir(tmp_path / "logs" / run_id, run_id, redis_url)
    proc = rlstream("audit", run_id, "--log-path", str(tmp_path / "logs"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    f = fields(proc.stdout)
    assert f["groups_lost"] == f"1  [{gid(99)}]"
    assert proc.stdout.splitlines()[-1] == "result: FAILED: lost groups (1)"


def test_audit_twice_and_step_gap_exit_1(r, run_id, redis_url, tmp_path):
    for row in range(2):
        bus.xadd(r, keys.events(run_id), admitted(row))
    e0 = add_samples(r, run_id, 0)
    commit(r, run_id, 1, [0], e0)
    commit(r, run_id, 3, [0, 1], e0 + add_samples(r, run_id, 1))
    run_dir = write_run_dir(tmp_path / "run", run_id, redis_url)
    proc = rlstream("audit", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 1
    f = fields(proc.stdout)
    assert f["trained_twice"] == str(1 + 2 * G)  # the group, its G sample ids, its G entry ids
    assert f["missing_steps"] == "2"
    last = proc.stdout.splitlines()[-1]
    assert "trained twice" in last and "missing 2" in last and "lost" not in last


def test_dead_lists_entries(r, run_id, redis_url, tmp_path):
    with r.pipeline(transaction=True) as pipe:
        reads.dead_letter(pipe, run_id, keys.rollouts(run_id), "5-0", "invalid rollout_sample: tokens", b"x")
        reads.dead_letter(pipe, run_id, keys.rollouts(run_id), "6-1", "two\nlines", b"")
        pipe.execute()
    r.xadd(keys.dead(run_id), {bus.FIELD: b"\xc1"})  # not a DeadLetter at all
    dead_ids = [sid(e) for e, _ in r.xrange(keys.dead(run_id))]
    run_dir = write_run_dir(tmp_path / "run", run_id, redis_url)
    proc = rlstream("dead", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{dead_ids[0]}  5-0  invalid rollout_sample: tokens"
    assert lines[1] == f"{dead_ids[1]}  6-1  two lines"
    assert lines[2].startswith(f"{dead_ids[2]}  ?  undecodable dead letter: ")
    assert lines[3] == "dead_letters: 3"
    assert len(lines) == 4


def test_dead_empty(r, run_id, redis_url, tmp_path):
    run_dir = write_run_dir(tmp_path / "run", run_id, redis_url)
    proc = rlstream("dead", str(run_dir), cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "dead_letters: 0\n")


def test_xrange_all_pages(r, run_id):
    stream = keys.rollouts(run_id)
    with r.pipeline(transaction=False) as pipe:
        for i in range(2500):
            pipe.xadd(stream, {bus.FIELD: str(i).encode()})
        pipe.execute()
    assert [raw for _, raw in xrange_all(r, stream)] == [str(i).encode() for i in range(2500)]
    assert len(list(xrange_all(r, stream, page=7))) == 2500
    assert list(xrange_all(r, keys.rollouts(run_id + "-none"))) == []
    report = collect_audit(r, run_id)
    assert (report.rollouts_read, report.rollouts_undecodable) == (2500, 2500)


def test_audit_starts_and_stops_the_embedded_server(tmp_path):
    """A finished run: its redis-server is gone; audit restarts it from the AOF, then stops it."""
    run_id = "audit-embedded"
    run_dir = tmp_path / "run"
    server = EmbeddedRedis(run_dir / "redis")
    url = server.start()
    try:
        r = connect(url)
        bus.xadd(r, keys.events(run_id), admitted(0))
        commit(r, run_id, 1, [0], add_samples(r, run_id, 0))
        r.close()
    finally:
        server.stop()
    write_run_dir(run_dir, run_id, url)
    proc = rlstream("audit", str(run_dir), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fields(proc.stdout)["groups_trained"] == "1"
    assert not (run_dir / "redis" / "url").exists()  # stopped cleanly
    with pytest.raises(RedisUnavailable):
        connect(url, timeout=0.3)
