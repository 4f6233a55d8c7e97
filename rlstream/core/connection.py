"""Building Redis clients: the one I/O edge with retries (bounded, exponential backoff).

Connections are built in each process's ``main()`` and passed down; nothing here keeps a
client at module level. The password comes from the URL, else ``RLSTREAM_REDIS_PASSWORD``,
else the caller's ``password`` (the embedded server's file); messages show the URL with
its password redacted (``rlstream.core.credentials``).
"""
from __future__ import annotations

import logging
import os
import time

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, BusyLoadingError, ConnectionError, NoPermissionError, TimeoutError
from redis.retry import Retry

from rlstream.core.credentials import PASSWORD_ENV, redacted, url_password
from rlstream.core.errors import RedisUnavailable

log = logging.getLogger(__name__)


def _password(url: str, password: str | None) -> str | None:
    return url_password(url) or os.environ.get(PASSWORD_ENV) or password


def client(url: str, *, command_retries: int = 8, password: str | None = None) -> redis.Redis:
    """A client whose commands retry on connection loss (e.g. a redis-server restart) with
    exponential backoff capped at 2 s, ``command_retries`` times, then raise."""
    return redis.Redis.from_url(
        url,
        password=_password(url, password),  # a password in the URL wins (redis-py), so this is the fallback
        decode_responses=False,
        socket_connect_timeout=5,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=command_retries),
        retry_on_error=[ConnectionError, TimeoutError, BusyLoadingError],
    )


def connect(url: str, timeout: float = 15.0, *, password: str | None = None) -> redis.Redis:
    """Return a client once ``PING`` answers; raise ``RedisUnavailable`` after ``timeout``,
    or at once when the server refuses the credentials (retrying cannot fix those).

    The probe client has no per-command retries (they would sleep ~9 s inside one PING and
    overrun ``timeout``); the returned client has them, for reconnects later on."""
    probe = client(url, command_retries=0, password=password)
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            probe.ping()
            probe.close()
            return client(url, password=password)
        except (AuthenticationError, NoPermissionError) as exc:
            probe.close()
            raise RedisUnavailable(
                f"Redis at {redacted(url)} refused the credentials ({exc}); put the user name in redis.url "
                f"(redis://USER@host:port/0) and the password in {PASSWORD_ENV} (or in the URL you pass by hand)"
            ) from None
        except (redis.RedisError, OSError) as exc:  # includes a non-Redis server's protocol errors
            if time.monotonic() + delay > deadline:
                probe.close()
                raise RedisUnavailable(
                    f"cannot reach Redis at {redacted(url)} after {timeout:.0f} s ({exc}); start the "
                    "server or fix redis.url / RLSTREAM_REDIS_URL (unset it to use the embedded one)"
                ) from None
            log.debug("redis not ready at %s (%s); retrying in %.2fs", redacted(url), exc, delay)
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
