"""Where an SDK service's bus runs (docs/design.md §15.68 Reconnect and close): an external
``redis.url`` as is; else the run's embedded redis-server, attached to when an earlier service
left it running, started (from its AOF, on a reconnect) otherwise; and stopping it on close.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import redis

from rlstream.core.config import Config
from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis, stored_password
from rlstream.core.errors import RedisUnavailable

log = logging.getLogger(__name__)
SHUTDOWN_WAIT_S = 10.0


def open_bus(cfg: Config, run_dir: Path, *, keep_running: bool) -> tuple[redis.Redis, EmbeddedRedis | None, bool]:
    """(client, the embedded server this call started or None, whether it attached to a running
    embedded one). ``keep_running``: a server started here outlives this process."""
    embedded_dir = run_dir / "redis"
    if cfg.redis.url is not None and not embedded_dir.is_dir():
        return connect(cfg.redis.url, cfg.redis.connect_timeout), None, False
    if cfg.redis.url is not None:  # a reconnect: is the run's embedded server still up?
        try:
            return connect(cfg.redis.url, 1.0, password=stored_password(embedded_dir)), None, True
        except RedisUnavailable:
            pass
    embedded = EmbeddedRedis(embedded_dir, detached=keep_running)
    return connect(embedded.start(), cfg.redis.connect_timeout), embedded, False


def stop_bus(r: redis.Redis, run_dir: Path, embedded: EmbeddedRedis | None, attached: bool) -> None:
    """Stop the run's embedded server: the one we started, or one we attached to (SHUTDOWN
    flushes its AOF; we wait, bounded, for its process to go). An external Redis is not ours."""
    if embedded is not None:
        embedded.stop()
        return
    if not attached:
        return
    pid_file = run_dir / "redis" / "pid"
    pid = int(pid_file.read_text()) if pid_file.is_file() else None
    try:
        r.shutdown()
    except redis.RedisError as exc:  # redis-py may report the connection a successful SHUTDOWN closed
        log.debug("SHUTDOWN: %s", exc)
    deadline = time.monotonic() + SHUTDOWN_WAIT_S
    while pid is not None and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid is not None and _alive(pid):
        log.warning("the run's redis-server (pid %d) did not stop within %.0f s after SHUTDOWN; stop it yourself",
                    pid, SHUTDOWN_WAIT_S)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie (exited, not yet reaped) is gone for every purpose here
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True
