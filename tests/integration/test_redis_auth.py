"""ACL users (``redis://user:pass@host``) and TLS (``rediss://``) against a real redis-server
(the system's, Debian's redis 7; skipped with the reason when it, or openssl for TLS, is
missing): rlstream's client, the event bus and the rq queue work on both, the password
can come from RLSTREAM_REDIS_PASSWORD instead of the URL, and refused credentials fail
at once with what to do (Reliability II, item 7)."""
from __future__ import annotations

import pytest
import redis
from external_redis import ExternalRedis
from factories import legacy_config, rlstream
from rq import Queue
from rq.serializers import JSONSerializer

from rlstream.core import bus, connection, keys
from rlstream.core.connection import connect
from rlstream.core.credentials import PASSWORD_ENV
from rlstream.core.errors import RedisUnavailable
from rlstream.core.messages import GroupRejected

pytestmark = pytest.mark.integration


@pytest.fixture(params=["acl", "acl+tls"])
def server(request, tmp_path_factory):
    with ExternalRedis(tmp_path_factory.mktemp("ext-redis"), tls=request.param == "acl+tls") as s:
        yield s


def no_retry(seconds: float) -> None:
    raise AssertionError("connect() backed off to retry credentials the server refused")


def round_trip(r: redis.Redis, run_id: str) -> None:
    """The calls every role makes: XADD/XREAD on the events stream, an rq enqueue."""
    msg = GroupRejected(group_id="e0-r1-a0", reason="test", by="test")
    bus.xadd(r, keys.events(run_id), msg)
    entries, _ = bus.read_events(r, run_id, "0-0")
    assert [m for _, m in entries] == [msg]
    queue = Queue(keys.job_queue_name(run_id), connection=r, serializer=JSONSerializer)
    job = queue.enqueue("rlstream.workers.jobs.run_group", {"group_id": "g"}, job_id=f"{run_id}-g")
    assert list(queue.fetch_job(job.id).args) == [{"group_id": "g"}]


def test_password_in_the_url(server, run_id, monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    r = connect(server.url, timeout=5)
    assert r.acl_whoami() in ("alice", b"alice")
    round_trip(r, run_id)
    r.close()


def test_password_from_the_environment(server, run_id, monkeypatch):
    """What `rlstream up` children get: the URL without the password, plus the env var."""
    monkeypatch.setenv(PASSWORD_ENV, server.password)
    r = connect(server.url_without_password, timeout=5)
    assert r.acl_whoami() in ("alice", b"alice")
    round_trip(r, run_id)
    r.close()


@pytest.mark.parametrize("password", [None, "wrong"])
def test_missing_or_wrong_password_is_refused_at_once(server, monkeypatch, password):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    if password:
        monkeypatch.setenv(PASSWORD_ENV, password)
    monkeypatch.setattr(connection.time, "sleep", no_retry)
    with pytest.raises(RedisUnavailable, match="refused the credentials") as info:
        connect(server.url_without_password, timeout=60)
    assert server.password not in str(info.value)


def test_plain_tcp_to_a_tls_port_does_not_connect(tmp_path):
    with ExternalRedis(tmp_path, tls=True) as tls_server:
        plain = f"redis://alice:{tls_server.password}@127.0.0.1:{tls_server.port}/0"
        with pytest.raises(RedisUnavailable) as info:
            connect(plain, timeout=1)
        assert tls_server.password not in str(info.value)


def test_status_cli_reads_an_acl_run_with_the_password_from_the_environment(server, run_id, tmp_path):
    """A standalone process (here `rlstream status`) on a config.json that has no password."""
    import json


    run_dir = tmp_path / "runs" / run_id
    run_dir.mkdir(parents=True)
    cfg = legacy_config(run_id=run_id, redis={"url": server.url})
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    assert server.password not in (run_dir / "config.json").read_text()
    proc = rlstream("status", str(run_dir), timeout=60, env={PASSWORD_ENV: server.password})
    assert proc.returncode == 0, proc.stderr
    assert server.password not in proc.stdout + proc.stderr
