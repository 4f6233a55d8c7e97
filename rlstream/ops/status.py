"""``rlstream status [RUN]``: versions, stream lengths, pending entries, live workers,
in-flight groups and the last step's reward, read from Redis.

After a run has ended its embedded redis-server is gone; status then starts it from
the run directory's AOF for the time of the query.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rq import Worker
from rq.registry import StartedJobRegistry

from rlstream.core import bus, keys
from rlstream.core.archive import Archive, ArchiveError
from rlstream.core.codec import DecodeError, decode
from rlstream.core.config import validate_config
from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis, stored_password
from rlstream.core.errors import ConfigError, RedisUnavailable
from rlstream.core.fold_snapshot import start_fold
from rlstream.core.jobs import job_queue
from rlstream.core.memory_guard import memory_use
from rlstream.core.messages import GroupSampled, Message, StepCommitted
from rlstream.core.run_state import RunState
from rlstream.ops.progress import buffered_samples

RATE_WINDOW_S = 60.0  # status's rates: the last minute


def find_run_dir(run: str | None, log_path: str) -> Path:
    if run is not None:
        for candidate in (Path(run), Path(log_path) / run):
            if (candidate / "config.json").is_file():
                return candidate
        raise ConfigError(f"no run {run!r}: expected a run directory holding config.json (or an id under {log_path}/)")
    runs = sorted(Path(log_path).glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError(f"no runs under {log_path}/")
    return runs[-1].parent


def _connect_run(run_dir: Path):
    """(cfg, client, embedded-or-None): connect to the run's Redis, starting its embedded
    server from the run directory when it is not running."""
    cfg = validate_config(json.loads((run_dir / "config.json").read_text()))
    embedded = None
    # config.json has no password: RLSTREAM_REDIS_PASSWORD, else the embedded server's file
    password = stored_password(run_dir / "redis")
    try:
        if not cfg.redis.url:
            raise RedisUnavailable(f"{run_dir}/config.json has no redis.url")
        r = connect(cfg.redis.url, timeout=1.0, password=password)
    except RedisUnavailable:
        if not (run_dir / "redis").is_dir():
            raise
        embedded = EmbeddedRedis(run_dir / "redis")
        if embedded.owner_pid() is not None:  # `rlstream up` is restarting it: wait, never start a second
            return cfg, connect(cfg.redis.url, timeout=cfg.redis.connect_timeout, password=password), None
        r = connect(embedded.start(), timeout=cfg.redis.connect_timeout)
    return cfg, r, embedded


@contextmanager
def opened_run(run: str | None, log_path: str) -> Iterator[tuple[Path, Any, Any]]:
    """(run_dir, cfg, client) for ``audit``, ``dead`` and ``status``; closes the client and
    stops an embedded server it had to start."""
    run_dir = find_run_dir(run, log_path)
    cfg, r, embedded = _connect_run(run_dir)
    try:
        yield run_dir, cfg, r
    finally:
        r.close()
        if embedded is not None:
            embedded.stop()


def archive_status(run_dir: Path | None, run_id: str) -> dict:
    """The archive's size from its manifest, and the segments it lists that are missing
    (a cheap check; ``rlstream audit`` verifies every segment's digest)."""
    if run_dir is None:
        return {}
    archive = Archive(run_dir, run_id)
    try:
        segments = archive.segments()
    except ArchiveError as exc:
        return {"error": str(exc)}
    missing = [s.file for s in segments if not (archive.dir / s.file).is_file()]
    return {"segments": len(segments), "rollouts": sum(s.entries for s in segments),
            "mb": round(sum(s.bytes for s in segments) / 1e6, 1), "upto": archive.upto() or "-",
            **({"MISSING": ",".join(missing)} if missing else {})}


def folded_state(r, run_id: str, run_dir: Path | None) -> RunState:
    """The run's state: the newest checkpoint's fold snapshot plus the events after it
    (docs/design.md §15.47 Processes start from the checkpoint's fold), so a status polled every
    few seconds does not decode the whole events stream each time."""
    state, cursor = start_fold(run_dir, r, run_id)
    for _, msg in bus.iter_all_events(r, run_id, after=cursor):
        state.apply(msg)
    return state


def window_rates(r, run_id: str, window_s: float, finished: bool) -> dict:
    """``EventRates`` over the trailing window, read by entry id (the Redis server's clock in
    ms): the window's events only, however long the run. A finished run's window ends at its
    last sample or step (found reading back from the stream's end)."""
    stream, rates = keys.events(run_id), EventRates()
    if finished:
        end, upper = None, "+"
        while end is None:
            page = r.xrevrange(stream, max=upper, min="-", count=200)
            for entry_id, fields in page:
                msg = _decoded(fields)
                if isinstance(msg, (GroupSampled, StepCommitted)):
                    end = bus.as_text(entry_id)
                    break
            if end is None and len(page) < 200:
                return rates.over(window_s, None)
            upper = "(" + bus.as_text(page[-1][0]) if end is None else upper
        end_ms = int(end.split("-")[0])
    else:
        seconds, micros = r.time()
        end_ms = seconds * 1000 + micros // 1000
    start = max(0, end_ms - int(window_s * 1000))
    for entry_id, raw in bus.xrange_all(r, stream, start=f"({start}-{2**64 - 1}" if start else "-",
                                        end=f"{end_ms}-{2**64 - 1}"):
        msg = _decoded({bus.FIELD: raw})
        if msg is not None:
            rates.add(entry_id, msg)
    return rates.over(window_s, None if finished else end_ms / 1000)


def _decoded(fields) -> Message | None:
    try:
        return decode((fields or {}).get(bus.FIELD, b""))
    except DecodeError:
        return None


def collect_status(cfg, r, run_dir: Path | None = None, window_s: float = RATE_WINDOW_S) -> dict:
    state = folded_state(r, cfg.run_id, run_dir)
    m = state.last_step.metrics if state.last_step else {}
    queue = job_queue(r, cfg)
    stats = bus.rollout_stats(r, cfg.run_id)
    return {
        "run_id": cfg.run_id,
        "state": f"finished ({state.finished.reason})" if state.finished else "running",
        "published_version": state.published_version,
        "steps": state.steps,
        "last_reward": m.get("rollout/reward_mean"),
        "groups": {"admitted": len(state.admitted), "trained": len(state.trained),
                   "rejected": len(state.rejected), "in_flight": len(state.open_groups)},
        "streams": {name: r.xlen(key(cfg.run_id)) for name, key in
                    (("rollouts", keys.rollouts), ("events", keys.events), ("dead", keys.dead))},
        "archive": archive_status(run_dir, cfg.run_id),
        "redis_memory_mb": redis_memory_mb(r),
        "trainer_pending": bus.group_info(r, keys.rollouts(cfg.run_id))["pending"],
        "buffered_samples": buffered_samples(r, cfg.run_id),
        "queued_jobs": queue.count,
        "live_workers": len(Worker.all(queue=queue)),
        "worker_versions": worker_versions(r, cfg.run_id),
        "rollout_errors": {k: v for k, v in sorted(stats.items()) if k != keys.GATE_CLOSED_MS},
        "backlog": backlog(cfg, state, queue),
        "rates": window_rates(r, cfg.run_id, window_s, state.finished is not None),
        "gate_closed_s_total": stats.get(keys.GATE_CLOSED_MS, 0) / 1000,
    }


def backlog(cfg, state: RunState, queue) -> dict:
    """What an autoscaler reads: work waiting for a worker, work being sampled, and room the gate
    has left (``gate_headroom_samples`` <= 0: workers are ahead of the trainer, adding more will not help)."""
    # The producer's staleness capacity (docs/design.md §5 Versions and the gate; ops may not import producers).
    version = state.published_version if cfg.weight_sync_interval else state.steps
    return {"queued_jobs": queue.count, "started_jobs": StartedJobRegistry(queue=queue).count,
            "unsampled_groups": len(state.unsampled_groups), "in_flight_groups": len(state.open_groups),
            "gate_headroom_samples": (version + cfg.offpolicy_versions + 1) * cfg.batch_size - state.reserved_samples}


class EventRates:
    """Rates from the events stream alone: an entry id is the Redis server's clock in ms, so the
    samples, tokens, steps and groups of a trailing window need no timestamps of their own."""

    def __init__(self):
        self.events: list[tuple[float, int, int, int]] = []  # (time, samples, tokens, steps)

    def add(self, event_id: str, msg) -> None:
        if isinstance(msg, (GroupSampled, StepCommitted)):
            t = int(event_id.split("-")[0]) / 1000
            sampled = isinstance(msg, GroupSampled)
            self.events.append((t, msg.samples if sampled else 0, msg.tokens if sampled else 0, 0 if sampled else 1))

    def over(self, window_s: float, now: float | None) -> dict:
        """Per-second rates over the ``window_s`` seconds up to ``now`` (a finished run: up to its
        last sample or step, so the figures describe it rather than read zero)."""
        end = now if now is not None else max((e[0] for e in self.events), default=0.0)
        recent = [e for e in self.events if e[0] > end - window_s]
        out = {"window_s": window_s}
        for i, name in ((1, "samples_per_s"), (2, "tokens_per_s"), (3, "steps_per_s")):
            out[name] = round(sum(e[i] for e in recent) / window_s, 4)
        return out


def redis_memory_mb(r) -> dict:
    """used / maxmemory (MiB; max 0 = no limit), as the memory guard sees them."""
    used, limit = memory_use(r)
    return {"used": round(used / 2**20, 1), "max": round(limit / 2**20, 1)} if used is not None else {}


def worker_versions(r, run_id: str) -> dict[str, int]:
    """Worker id -> the policy version it last sampled with (its heartbeat key, 60 s TTL)."""
    prefix = keys.worker_heartbeat(run_id, "")
    names = sorted(r.scan_iter(match=keys.worker_heartbeat_pattern(run_id), count=1000))
    values = r.mget(names) if names else []
    return {n.decode().removeprefix(prefix): int(v) for n, v in zip(names, values) if v is not None}


def status_main(run: str | None, log_path: str, as_json: bool = False) -> int:
    with opened_run(run, log_path) as (run_dir, cfg, r):
        status = collect_status(cfg, r, run_dir)
    if as_json:
        print(json.dumps(status, indent=1, sort_keys=True))
        return 0
    width = max(len(k) for k in status)
    for k, v in status.items():
        if isinstance(v, dict):
            v = "  ".join(f"{a}={b}" for a, b in v.items())
        print(f"{k:<{width}}  {v}")
    return 0
