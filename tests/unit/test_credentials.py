"""A Redis password never lands in config.json, an event, a log line or an error message;
children get it in their environment; run directories and secrets are owner-only
(Reliability II, item 7)."""
from __future__ import annotations

import json
import logging
import stat

import pytest

from rlstream.core import connection
from rlstream.core.config import Config, load_config
from rlstream.core.credentials import (
    PASSWORD_ENV,
    private_dir,
    read_or_create_secret,
    redacted,
    url_password,
    without_password,
)
from rlstream.core.errors import ConfigError, RedisUnavailable
from rlstream.core.messages import RunStarted
from rlstream.launcher import _child_env

PW = "s3cr3t-Pa55"


@pytest.mark.parametrize("url, stripped, shown", [
    (f"redis://:{PW}@h:6379/0", "redis://h:6379/0", "redis://:***@h:6379/0"),
    (f"redis://alice:{PW}@h/0", "redis://alice@h/0", "redis://alice:***@h/0"),
    (f"rediss://alice:{PW}@h:6380/0?ssl_ca_certs=/x/ca.pem", "rediss://alice@h:6380/0?ssl_ca_certs=/x/ca.pem",
     "rediss://alice:***@h:6380/0?ssl_ca_certs=/x/ca.pem"),
    (f"unix://:{PW}@/tmp/x/redis.sock", "unix:///tmp/x/redis.sock", "unix://:***@/tmp/x/redis.sock"),
    (f"redis://h/0?password={PW}&db=1", "redis://h/0?db=1", "redis://h/0?db=1&password=***"),
    (f"redis://:{PW}@[::1]:6379/0", "redis://[::1]:6379/0", "redis://:***@[::1]:6379/0"),
])
def test_urls_lose_their_password(url, stripped, shown):
    assert url_password(url) == PW
    assert without_password(url) == stripped and url_password(stripped) is None
    assert redacted(url) == shown and PW not in shown


@pytest.mark.parametrize("url", ["unix:///tmp/x.sock", "redis://alice@h", "redis://h:6379/0", None])
def test_urls_without_a_password_are_unchanged(url):
    assert without_password(url) == url and redacted(url) == url


def test_percent_encoded_passwords_are_decoded():
    assert url_password("redis://u:p%40ss@h/0") == "p@ss"


def test_config_dumps_drop_the_password_but_keep_the_user():
    cfg = Config(run_id="r", redis={"url": f"redis://alice:{PW}@h:6379/0"})
    assert cfg.redis.url == f"redis://alice:{PW}@h:6379/0"  # the process itself still has it
    dumped = json.dumps(cfg.model_dump(mode="json"))
    assert PW not in dumped and "redis://alice@h:6379/0" in dumped
    assert PW not in json.dumps(RunStarted(run_id="r", config=cfg.model_dump(mode="json")).model_dump(mode="json"))
    assert PW not in repr(cfg) and PW not in str(cfg)
    kept = cfg.model_dump(mode="json", context={"secrets": True})  # rlstream.api's in-process round trip
    assert kept["redis"]["url"] == cfg.redis.url


def test_children_get_the_password_in_their_environment_only(monkeypatch):
    monkeypatch.setenv("RLSTREAM_REDIS_URL", f"redis://alice:{PW}@h/0")
    monkeypatch.setenv(PASSWORD_ENV, "stale")
    env = _child_env(PW)
    assert env[PASSWORD_ENV] == PW and "RLSTREAM_REDIS_URL" not in env
    assert PASSWORD_ENV not in _child_env(None)


def test_client_takes_the_password_from_the_url_then_env_then_the_fallback(monkeypatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)

    def password_of(url, fallback=None):
        return connection.client(url, password=fallback).connection_pool.connection_kwargs.get("password")

    assert password_of("redis://h/0") is None
    assert password_of("redis://h/0", "file") == "file"
    monkeypatch.setenv(PASSWORD_ENV, "env")
    assert password_of("redis://alice@h/0", "file") == "env"
    assert password_of(f"redis://alice:{PW}@h/0", "file") == PW
    assert connection.client("redis://alice@h/0").connection_pool.connection_kwargs["username"] == "alice"


def test_connect_errors_and_logs_show_no_password(monkeypatch, caplog):
    def refuse(self):
        raise connection.redis.ConnectionError("refused")

    monkeypatch.setattr(connection.redis.Redis, "ping", refuse)
    with caplog.at_level(logging.DEBUG), pytest.raises(RedisUnavailable) as info:
        connection.connect(f"redis://alice:{PW}@127.0.0.1:1/0", timeout=0.2)
    assert "alice:***@127.0.0.1" in str(info.value)
    assert PW not in str(info.value) and PW not in caplog.text


def test_refused_credentials_fail_at_once_with_what_to_do(monkeypatch):
    def refuse(self):
        raise connection.AuthenticationError("invalid username-password pair")

    def no_retry(seconds):
        raise AssertionError("connect() backed off to retry credentials the server refused")

    monkeypatch.setattr(connection.redis.Redis, "ping", refuse)
    monkeypatch.setattr(connection.time, "sleep", no_retry)
    with pytest.raises(RedisUnavailable, match=f"refused the credentials.*{PASSWORD_ENV}") as info:
        connection.connect(f"redis://alice:{PW}@h/0", timeout=600)
    assert PW not in str(info.value)


def test_private_dir_and_secret_are_owner_only(tmp_path):
    run = private_dir(tmp_path / "runs" / "r1")
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    secret = read_or_create_secret(run / "password")
    assert stat.S_IMODE((run / "password").stat().st_mode) == 0o600
    assert read_or_create_secret(run / "password") == secret and len(secret) >= 32


def test_lost_redis_message_is_redacted():
    from rlstream import cli

    cfg = load_config(None, [f"redis.url=redis://alice:{PW}@h/0", "run_id=r"], environ={})
    assert PW not in str(cli._lost_redis(cfg, OSError("x")))



def test_config_errors_show_no_password():
    with pytest.raises(ConfigError) as info:
        load_config(None, [f'redis.url="http://alice:{PW}@h:6379/0"'], environ={})
    assert "redis.url" in str(info.value) and "alice:***@h" in str(info.value) and PW not in str(info.value)
