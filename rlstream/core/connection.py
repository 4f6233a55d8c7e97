"""Building Redis clients: the one I/O edge with retries (bounded, exponential backoff),
and counting the connection errors a client's retries absorb (``count_connection_errors``).

Every read on a client's socket is bounded (``SOCKET_TIMEOUT_S``, longer than the longest
blocking read rlstream issues: XREAD / XREADGROUP block 200-1000 ms; rq's worker raises it
to its own dequeue bound, see ``rlstream.workers.main``), and TCP connections use
keepalive probes, so a half-open connection (a peer gone without a FIN) ends in an error
that the bounded retries then handle, instead of a read that blocks forever.

Connections are built in each process's ``main()`` and passed down; nothing here keeps a
client at module level. The password comes from the URL, else ``RLSTREAM_REDIS_PASSWORD``,
else the caller's ``password`` (the embedded server's file); messages show the URL with
its password redacted (``rlstream.core.credentials``).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, BusyLoadingError, ConnectionError, NoPermissionError, TimeoutError
from redis.retry import Retry

from rlstream.core.credentials import PASSWORD_ENV, redacted, url_password
from rlstream.core.errors import RedisUnavailable

log = logging.getLogger(__name__)
LONGEST_BLOCK_S = 1.0  # the longest block_ms of any XREAD / XREADGROUP rlstream issues
SOCKET_TIMEOUT_S = 10.0  # > LONGEST_BLOCK_S with room for a slow reply (a large XRANGE page, an fsync stall)
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 10, 5, 3  # a silent peer is dropped after ~25 s idle


def keepalive_options() -> dict[int, int]:
    """TCP keepalive settings this platform knows (Linux: TCP_KEEPIDLE; macOS: TCP_KEEPALIVE)."""
    out = {}
    for names, value in ((("TCP_KEEPIDLE", "TCP_KEEPALIVE"), KEEPALIVE_IDLE_S),
                         (("TCP_KEEPINTVL",), KEEPALIVE_INTERVAL_S), (("TCP_KEEPCNT",), KEEPALIVE_PROBES)):
        option = next((getattr(socket, n) for n in names if hasattr(socket, n)), None)
        if option is not None:
            out[option] = value
    return out


def _password(url: str, password: str | None) -> str | None:
    return url_password(url) or os.environ.get(PASSWORD_ENV) or password


def client(url: str, *, command_retries: int = 8, password: str | None = None) -> redis.Redis:
    """A client whose commands retry on connection loss (e.g. a redis-server restart) with
    exponential backoff capped at 2 s, ``command_retries`` times, then raise; every socket
    read is bounded by ``SOCKET_TIMEOUT_S`` (a timeout is retried like a lost connection)."""
    tcp = {} if url.startswith("unix:") else {"socket_keepalive": True, "socket_keepalive_options": keepalive_options()}
    return redis.Redis.from_url(
        url,
        password=_password(url, password),  # a password in the URL wins (redis-py), so this is the fallback
        decode_responses=False,
        socket_connect_timeout=5,
        socket_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=command_retries),
        retry_on_error=[ConnectionError, TimeoutError, BusyLoadingError],
        **tcp,  # a unix socket has no keepalive (and redis-py rejects the options there)
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


class _CountingRetry(Retry):
    """A client's retry policy, unchanged, that counts the connection errors it absorbs."""

    def __init__(self, inner: Retry):
        super().__init__(inner._backoff, inner._retries, inner._supported_errors)
        self.errors = 0

    def call_with_retry(self, do, fail, *args, **kwargs):
        def counting_fail(error, *fail_args):
            self.errors += 1
            return fail(error, *fail_args)

        return super().call_with_retry(do, counting_fail, *args, **kwargs)


def count_connection_errors(r: redis.Redis) -> Callable[[], int]:
    """How many connection errors ``r`` has retried through so far. A retried command may
    have taken effect before its reply was lost (an XREADGROUP's entries are then pending
    but were never returned), so a caller that cares re-reads after the count moves."""
    retry = r.get_retry()
    if not isinstance(retry, Retry):  # e.g. fakeredis, or a client built without retries
        return lambda: 0
    counting = _CountingRetry(retry)
    r.set_retry(counting)
    return lambda: counting.errors
