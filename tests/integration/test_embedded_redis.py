"""The embedded redis-server (rlstream.core.embedded_redis) and connect()'s failure mode.

docs/design.md §10 Failure semantics and §14 Measured facts and pitfalls: with AOF on, a
SIGKILLed redis-server loses no acknowledged write
(appendfsync everysec: the write reaches the OS page cache before the reply, so a process
kill loses nothing; only an OS crash can lose ~1 s).
"""
from __future__ import annotations

import socket
import stat
import threading
import time
from pathlib import Path

import factories
import pytest
import redis
from factories import legacy_config

from rlstream.core import bus, embedded_redis, keys
from rlstream.core.codec import decode
from rlstream.core.connection import connect
from rlstream.core.credentials import PASSWORD_ENV, url_password, without_password
from rlstream.core.embedded_redis import EmbeddedRedis
from rlstream.core.errors import RedisUnavailable
from rlstream.core.messages import RolloutRecord

pytestmark = pytest.mark.integration


def sample(i: int) -> RolloutRecord:
    """Row ``i``'s group of one."""
    return factories.sample(i, tokens=(1, 2, 3, i), logprobs=[0.0, -1.0, -0.5, -0.25], reward=float(i), group_size=1)


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


def test_aof_loses_no_acknowledged_write_on_sigkill(tmp_path):
    server = EmbeddedRedis(tmp_path)
    url = server.start()
    try:
        assert url == server.url
        assert (tmp_path / "url").read_text() == without_password(url)
        r = connect(url)
        stream = keys.rollouts("aof-test")
        ids = [bus.xadd(r, stream, sample(i)) for i in range(500)]  # each one acknowledged
        assert len(set(ids)) == 500
        r.close()
        server.kill()  # SIGKILL: no shutdown, no final AOF flush by redis itself
        assert not server.alive()
        assert (tmp_path / "appendonly.aof").stat().st_size > 0
    finally:
        server.kill()

    restarted = EmbeddedRedis(tmp_path)
    try:
        r2 = connect(restarted.start())
        assert restarted.url == url  # the same password and socket: clients' URLs stay valid
        assert (tmp_path / "url").read_text() == without_password(restarted.url)
        entries = r2.xrange(stream)
        assert [e for e, _ in entries] == ids
        assert [decode(f[bus.FIELD]) for _, f in entries] == [sample(i) for i in range(500)]
        r2.close()
    finally:
        restarted.stop()
    assert not restarted.alive()
    assert not (tmp_path / "url").exists()  # a clean stop removes the url file


def refuses_without_password(url: str) -> None:
    bare = redis.Redis.from_url(without_password(url), socket_connect_timeout=2)
    with pytest.raises(redis.AuthenticationError):
        bare.ping()
    bare.close()


def test_the_server_requires_its_random_password(tmp_path, monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    server = EmbeddedRedis(tmp_path / "run" / "redis")
    try:
        url = server.start()
        password = (tmp_path / "run" / "redis" / "password").read_text().strip()
        assert len(password) >= 32 and url_password(url) == password == server.password
        assert stat.S_IMODE((tmp_path / "run" / "redis" / "password").stat().st_mode) == 0o600
        assert stat.S_IMODE((tmp_path / "run" / "redis").stat().st_mode) == 0o700
        refuses_without_password(url)
        assert connect(without_password(url), password=password).ping()  # the file is the fallback
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline, "the password is on redis-server's command line (ps shows it)"
        assert password not in (tmp_path / "run" / "redis" / "url").read_text()
        assert password not in (tmp_path / "run" / "redis" / "redis.log").read_text()
    finally:
        server.stop()


def test_long_directory_uses_a_short_private_socket_directory(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server = EmbeddedRedis(deep)
    try:
        url = server.start()
        assert url.startswith("unix://"), "fell back to TCP: any local user could try to connect"
        socket_dir = server.socket_dir
        assert socket_dir is not None and stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
        assert (deep / "url").read_text() == without_password(url)
        refuses_without_password(url)
        assert connect(url).ping()
    finally:
        server.stop()
    assert not socket_dir.exists()


def test_tcp_fallback_still_requires_the_password(tmp_path, monkeypatch):
    """When no socket path fits (an absurd TMPDIR), loopback TCP, never without a password."""
    monkeypatch.setattr(embedded_redis, "_UNIX_PATH_MAX", 5)
    server = EmbeddedRedis(tmp_path)
    try:
        url = server.start()
        assert url.startswith("redis://:") and "@127.0.0.1:" in url
        refuses_without_password(url)
        assert connect(url).ping()
    finally:
        server.stop()


def test_connect_to_dead_port_raises_within_timeout():
    url = dead_url()
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            connect(url, timeout=1.0)
        except BaseException as exc:
            outcome.append(exc)

    t0 = time.monotonic()
    thread = threading.Thread(target=attempt, daemon=True)  # bounded wait: never stall the suite
    thread.start()
    thread.join(5.0)
    elapsed = time.monotonic() - t0
    assert not thread.is_alive(), f"connect(timeout=1.0) still retrying after {elapsed:.1f} s"
    assert len(outcome) == 1 and isinstance(outcome[0], RedisUnavailable)
    assert url in str(outcome[0])


def test_a_second_server_on_the_same_directory_is_refused(tmp_path):
    """Two redis-servers appending to one AOF would corrupt it (e.g. `rlstream up` twice
    on one run id, or `status` while `up` restarts its server)."""
    first = EmbeddedRedis(tmp_path / "redis")
    first.start()
    try:
        second = EmbeddedRedis(tmp_path / "redis")
        with pytest.raises(RedisUnavailable, match=rf"pid {first.process.pid}\) already serves"):
            second.start()
        assert second.owner_pid() == first.process.pid
        first.kill()  # dead: the directory is free again, and a restart of the same object is allowed
        assert second.owner_pid() is None
        first.start()
        assert connect(first.url).ping()
    finally:
        first.stop()


def test_a_standalone_worker_attached_to_an_up_run_finds_the_embedded_password(tmp_path, monkeypatch):
    """`rlstream worker runs/<id>/config.json` next to `up` (workers.count = 0): config.json
    has no password, so the CLI reads the embedded server's password file."""
    import json

    from rlstream import cli
    from rlstream.core.config import validate_config

    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    server = EmbeddedRedis(tmp_path / "runs" / "r" / "redis")
    try:
        url = server.start()
        cfg = legacy_config(run_id="r", log_path=tmp_path / "runs", redis={"url": url})
        written = json.dumps(cfg.model_dump(mode="json"))
        assert server.password not in written
        r = cli._connect(validate_config(json.loads(written)))
        assert r.ping()
        r.close()
    finally:
        server.stop()


def debug_sleeps(path, n: int, seconds: str) -> None:
    """An AOF whose replay takes n x ``seconds`` (DEBUG SLEEP is replayed like any command;
    redis reports its loading progress and answers clients every 1024 commands)."""
    cmd = f"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n${len(seconds)}\r\n{seconds}\r\n".encode()
    path.write_bytes(cmd * n)


def test_loading_a_long_aof_is_progress_not_failure(tmp_path):
    """A restart that replays a large AOF (here ~4 s of replay) must not be killed by a
    bound (here 2 s) that only means "no progress"."""
    debug_sleeps(tmp_path / "appendonly.aof", 12288, "0.0002")
    server = EmbeddedRedis(tmp_path)
    try:
        assert connect(server.start(timeout=2.0)).ping()
        assert "DB loaded from append only file" in (tmp_path / "redis.log").read_text()
    finally:
        server.stop()


def test_a_server_making_no_progress_is_stopped_with_a_clear_message(tmp_path):
    debug_sleeps(tmp_path / "appendonly.aof", 1, "30")  # one command that never reports progress
    server = EmbeddedRedis(tmp_path)
    try:
        with pytest.raises(RedisUnavailable, match="made no progress for 1 s"):
            server.start(timeout=1.0)
        assert not server.alive()
    finally:
        server.kill()
