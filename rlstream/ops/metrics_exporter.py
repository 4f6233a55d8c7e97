"""The run's Prometheus exporter (docs/operating.md): one per run, fed from the run's state in
Redis and its directory, so N workers on a host need no N ports. `rlstream up` serves it when
``metrics.port`` is set (``start_exporter``); ``rlstream metrics RUN`` serves it for a run
started role by role (``metrics_main``).

``RunCollector`` reads everything at scrape time, bounded: the events are folded incrementally
(the newest checkpoint's fold snapshot, then from a cursor kept between scrapes, at most
``FOLD_BUDGET_S`` per scrape), metrics.jsonl is read from the offset reached last time, the
rates come from the trailing minute of the events stream alone, and every Redis command has a
short socket timeout. A section that fails (Redis down) is counted and skipped; the scrape still
answers. Names: ``rlstream_`` + the exporter's own names, and each training metric key with its
"/" (and any other character Prometheus refuses) turned into "_": ``rollout/reward_mean`` ->
``rlstream_rollout_reward_mean`` (``metric_name``), every series labelled ``run_id``.

prometheus_client is imported here only, and this module only by the commands that serve, so
``rlstream --help`` stays instant.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry
from rq import Worker
from rq.registry import StartedJobRegistry

from rlstream.core import bus, keys
from rlstream.core.archive import Archive, ArchiveError
from rlstream.core.credentials import redacted
from rlstream.core.fold_snapshot import start_fold
from rlstream.core.jobs import job_queue
from rlstream.core.memory_guard import memory_use
from rlstream.core.messages import GroupRejected
from rlstream.core.run_state import RunState, rejection_stands
from rlstream.ops.progress import buffered_samples
from rlstream.ops.restarts import restart_counts
from rlstream.ops.status import RATE_WINDOW_S, backlog, window_rates

log = logging.getLogger(__name__)
PREFIX = "rlstream_"
DEFAULT_PORT = 9877  # `rlstream metrics`'s: an arbitrary fixed port, so that a scrape config can name it
SCRAPE_TIMEOUT_S = 5.0  # a scrape answers within about this, whatever state Redis is in
FOLD_BUDGET_S = 2.0  # of which folding new events may take this much; the rest waits for the next scrape
SOCKET_TIMEOUT_S = 2.0  # each Redis command's bound
METRICS_TAIL_BYTES = 1 << 20  # a first read of metrics.jsonl starts this far from its end
SECTIONS = ("redis", "fold", "rates", "queue", "streams", "counters", "memory", "archive", "training")
_INVALID = re.compile(r"[^a-zA-Z0-9_]")

# GroupRejected reasons are free text (they name rows, versions, errors): the label is their
# class, by the fixed prefixes or phrases the roles write (first match wins).
REJECT_CLASSES: tuple[tuple[str, re.Pattern], ...] = (
    ("stale", re.compile(r"^stale:")),  # trainer.staleness.STALE_PREFIX
    ("incomplete", re.compile(r"^incomplete:")),  # the trainer's buffer
    ("stranded", re.compile(r"re-dispatched \d+ times already")),  # the producer
    ("job_failed", re.compile(r"^rollout job failed")),  # the producer
    ("unusable_row", re.compile(r"^row \d+: ")),  # a worker: the row cannot be sampled
    ("draws_failed", re.compile(r"draws returned a valid sample\)?$")),  # a worker: too few valid samples
    ("samples_lost", re.compile(r"none of its samples reached")),  # the trainer
)
REJECT_LABELS = tuple(name for name, _ in REJECT_CLASSES) + ("other",)


def metric_name(key: str) -> str:
    """The Prometheus name of a training metric key: ``rollout/reward_mean`` -> ``rlstream_rollout_reward_mean``."""
    return PREFIX + _INVALID.sub("_", key)


def reject_class(reason: str) -> str:
    return next((name for name, pattern in REJECT_CLASSES if pattern.search(reason)), "other")


# name (without PREFIX) -> (type, help, source): every series the exporter serves besides the
# training metrics. docs/operating.md's table is this, and a test checks that they agree.
NATIVE: dict[str, tuple[str, str, str]] = {
    "step": ("gauge", "the newest committed optimizer step", "events fold"),
    "published_version": ("gauge", "the newest published policy version", "events fold"),
    "run_finished": ("gauge", "1 once the run has finished (RunFinished), 0 while it runs", "events fold"),
    "last_step_timestamp_seconds": ("gauge", "Unix time of the newest StepCommitted (the Redis server's clock)",
                                    "rl:{run}:committed_step"),
    "groups_admitted_total": ("counter", "prompt groups admitted", "events fold"),
    "groups_trained_total": ("counter", "prompt groups trained", "events fold"),
    "groups_rejected_total": ("counter", "prompt groups rejected, by reason class (label reason)", "events fold"),
    "in_flight_groups": ("gauge", "admitted groups neither trained nor rejected", "events fold"),
    "unsampled_groups": ("gauge", "admitted groups no worker has written yet", "events fold"),
    "in_flight_samples": ("gauge", "samples of the in-flight groups", "events fold"),
    "samples_sampled_total": ("counter", "samples the workers wrote (once per group)", "events fold"),
    "tokens_sampled_total": ("counter", "generated tokens of those samples", "events fold"),
    "samples_trained_total": ("counter", "samples of the trained groups", "events fold"),
    "samples_per_second": ("gauge", "samples written per second over the last minute", "events stream ids"),
    "tokens_per_second": ("gauge", "generated tokens per second over the last minute", "events stream ids"),
    "steps_per_second": ("gauge", "optimizer steps per second over the last minute", "events stream ids"),
    "queued_jobs": ("gauge", "rollout jobs waiting for a worker (the rq queue's length: what an autoscaler reads)",
                    "LLEN rq:queue:rl:{run}:jobs"),
    "started_jobs": ("gauge", "rollout jobs being sampled", "rq StartedJobRegistry"),
    "live_workers": ("gauge", "rq workers registered on the run's queue", "rq workers"),
    "gate_headroom_samples": ("gauge", "samples the staleness gate would still admit (<= 0: workers are ahead of "
                              "the trainer)", "events fold + config"),
    "trainer_pending_entries": ("gauge", "rollouts delivered to the trainer and not acknowledged",
                                "XPENDING rl:{run}:rollouts"),
    "buffered_samples": ("gauge", "rollouts written and not yet trained (pending + undelivered)",
                         "XINFO GROUPS rl:{run}:rollouts"),
    "stream_entries": ("gauge", "entries of each stream (label stream: rollouts, events, dead)", "XLEN"),
    "dead_letters": ("gauge", "entries of the dead-letter stream", "XLEN rl:{run}:dead"),
    "worker_invalid_samples_total": ("counter", "samples that failed the workers' checks",
                                     "rl:{run}:rollout_stats"),
    "worker_rollout_failures_total": ("counter", "rollout_fn draws that raised", "rl:{run}:rollout_stats"),
    "gate_closed_seconds_total": ("counter", "seconds the staleness gate held the producer back",
                                  "rl:{run}:rollout_stats"),
    "restarts_total": ("counter", "restarts `rlstream up` made, by role (label role: trainer, producer, worker, "
                       "redis, engine)", "rl:{run}:restarts"),
    "redis_up": ("gauge", "1 when the scrape reached the run's Redis", "PING"),
    "redis_memory_used_bytes": ("gauge", "Redis used_memory", "INFO memory"),
    "redis_memory_max_bytes": ("gauge", "Redis maxmemory (0 = no limit)", "INFO memory"),
    "archive_bytes": ("gauge", "bytes of the archive directory's files on disk", "runs/<id>/archive/"),
    "archive_segments": ("gauge", "archive segments its manifest lists", "runs/<id>/archive/manifest"),
    "training_metrics_step": ("gauge", "the step of the metrics.jsonl line the training metrics come from",
                              "metrics.jsonl"),
    "exporter_events_caught_up": ("gauge", "1 when this scrape folded every event (0: still catching up)",
                                  "exporter"),
    "exporter_scrape_duration_seconds": ("gauge", "how long this scrape took", "exporter"),
    "exporter_section_errors_total": ("counter", "sections of a scrape that failed, by section", "exporter"),
}


class _Families:
    """The families of one scrape, created on first use, each series labelled run_id."""

    def __init__(self, run_id: str):
        self.run_id, self.families, self.names = run_id, {}, set()

    def add(self, name: str, value: float, **labels: str) -> None:
        kind, text, _ = NATIVE[name]
        family = self.families.get(name)
        if family is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            # a counter family's name has no _total: prometheus_client appends it
            family = cls(PREFIX + name.removesuffix("_total"), text, labels=["run_id", *labels])
            self.families[name] = family
        family.add_metric([self.run_id, *labels.values()], float(value))

    def gauge(self, full_name: str, text: str, value: float) -> None:
        family = GaugeMetricFamily(full_name, text, labels=["run_id"])
        family.add_metric([self.run_id], value)
        self.families[full_name] = family


class MetricsTail:
    """The last training line and the last evaluation line of metrics.jsonl, read from the
    offset reached last time (a file that shrank, rewritten by a resuming trainer, is read anew)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, None
        self.train: dict | None = None
        self.evaluation: dict | None = None

    def read(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if self.offset is None or size < self.offset:
            self.offset = max(0, size - METRICS_TAIL_BYTES)
            skip_partial = self.offset > 0
        else:
            skip_partial = False
        if size == self.offset:
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read(size - self.offset)
        end = data.rfind(b"\n") + 1  # only whole lines; the rest waits for its newline
        lines = data[:end].split(b"\n")
        if skip_partial and lines:
            lines = lines[1:]
        self.offset += end
        for line in lines:
            try:
                row = json.loads(line) if line.strip() else None
            except ValueError:
                continue
            if isinstance(row, dict):
                if "eval/version" in row:
                    self.evaluation = row
                else:
                    self.train = row


class RunCollector:
    """A prometheus_client collector over one run (see the module docstring). ``r`` should have
    short socket timeouts (``exporter_client``)."""

    def __init__(self, cfg, r: redis.Redis, run_dir: Path | None, timeout_s: float = SCRAPE_TIMEOUT_S):
        self.cfg, self.r, self.run_dir, self.timeout_s = cfg, r, run_dir, timeout_s
        self.run_id = cfg.run_id
        self.state: RunState | None = None
        self.cursor = "0-0"
        self.rejected: Counter[str] = Counter()
        self.caught_up = False
        self.errors: Counter[str] = Counter()
        self.tail = MetricsTail(run_dir / "metrics.jsonl") if run_dir is not None else None
        self.lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []  # no collect() at registration: names are known only at scrape time

    def collect(self) -> Iterator[Metric]:
        with self.lock:  # the HTTP server may run two scrapes at once: they share the fold
            started = time.monotonic()
            out = _Families(self.run_id)
            self.scrape(out, started + self.timeout_s)
            out.add("exporter_scrape_duration_seconds", time.monotonic() - started)
        yield from out.families.values()

    # ----------------------------------------------------------------- the sections
    def scrape(self, out: _Families, deadline: float) -> None:
        redis_ok = self._section("redis", lambda: self.r.ping())
        out.add("redis_up", 1 if redis_ok else 0)
        sections = [("archive", self._archive), ("training", self._training)]
        if redis_ok:
            sections = [("fold", self._fold), ("rates", self._rates), ("queue", self._queue),
                        ("streams", self._streams), ("counters", self._counters), ("memory", self._memory),
                        *sections]
        for name, section in sections:
            if time.monotonic() > deadline:
                self.errors[f"{name}_deadline"] += 1
                continue
            self._section(name, lambda: section(out, deadline))
        for section, n in sorted({**dict.fromkeys(SECTIONS, 0), **self.errors}.items()):
            out.add("exporter_section_errors_total", n, section=section)

    def _section(self, name: str, run) -> bool:
        try:
            run()
            return True
        except (redis.RedisError, OSError, ValueError, ArchiveError) as exc:
            self.errors[name] += 1
            log.warning("metrics: section %s failed: %s", name, exc)
            return False

    def _fold(self, out: _Families, deadline: float) -> None:
        if self.state is None:
            self.state, self.cursor = start_fold(self.run_dir, self.r, self.run_id)
            self.rejected = Counter(reject_class(reason) for reason in self.state.rejected.values())
        stop = min(deadline, time.monotonic() + FOLD_BUDGET_S)
        self.caught_up = False
        pages = bus.event_pages(self.r, self.run_id, self.cursor)
        while time.monotonic() < stop:  # else the rest at the next scrape, from self.cursor
            page, last = next(pages, ([], None))
            if last is None:
                self.caught_up = True
                break
            for _, msg in page:
                if isinstance(msg, GroupRejected) and rejection_stands(msg, self.state.rejected, self.state.sampled):
                    self.rejected[reject_class(msg.reason)] += 1  # as the fold counts it (a void one: not)
                self.state.apply(msg)
            self.cursor = last
        s = self.state
        out.add("exporter_events_caught_up", 1 if self.caught_up else 0)
        out.add("step", s.steps)
        out.add("published_version", s.published_version)
        out.add("run_finished", 1 if s.finished is not None else 0)
        out.add("groups_admitted_total", len(s.admitted))
        out.add("groups_trained_total", len(s.trained))
        for label in REJECT_LABELS:
            out.add("groups_rejected_total", self.rejected[label], reason=label)
        out.add("in_flight_groups", len(s.open_groups))
        out.add("unsampled_groups", len(s.unsampled_groups))
        out.add("in_flight_samples", s.in_flight_samples)
        out.add("samples_sampled_total", s.sampled_samples)
        out.add("tokens_sampled_total", s.sampled_tokens)
        out.add("samples_trained_total", s.trained_samples)
        committed = self.r.hget(keys.committed_step(self.run_id), "event_id")
        if committed:
            out.add("last_step_timestamp_seconds", int(bus.as_text(committed).split("-")[0]) / 1000)

    def _rates(self, out: _Families, deadline: float) -> None:
        rates = window_rates(self.r, self.run_id, RATE_WINDOW_S, finished=False)  # a live view: up to now
        for name in ("samples_per_second", "tokens_per_second", "steps_per_second"):
            out.add(name, rates[name.replace("_second", "_s")])

    def _queue(self, out: _Families, deadline: float) -> None:
        queue = job_queue(self.r, self.cfg)
        out.add("queued_jobs", queue.count)
        out.add("started_jobs", StartedJobRegistry(queue=queue).count)
        out.add("live_workers", len(Worker.all(queue=queue)))
        if self.state is not None:
            out.add("gate_headroom_samples", backlog(self.cfg, self.state, queue)["gate_headroom_samples"])

    def _streams(self, out: _Families, deadline: float) -> None:
        for name, key in (("rollouts", keys.rollouts), ("events", keys.events), ("dead", keys.dead)):
            n = self.r.xlen(key(self.run_id))
            out.add("stream_entries", n, stream=name)
            if name == "dead":
                out.add("dead_letters", n)
        out.add("trainer_pending_entries", bus.group_info(self.r, keys.rollouts(self.run_id))["pending"])
        out.add("buffered_samples", buffered_samples(self.r, self.run_id))

    def _counters(self, out: _Families, deadline: float) -> None:
        stats = bus.rollout_stats(self.r, self.run_id)
        out.add("worker_invalid_samples_total", stats.get(keys.INVALID_SAMPLES, 0))
        out.add("worker_rollout_failures_total", stats.get(keys.ROLLOUT_FAILURES, 0))
        out.add("gate_closed_seconds_total", stats.get(keys.GATE_CLOSED_MS, 0) / 1000)
        for role, n in restart_counts(self.r, self.run_id).items():
            out.add("restarts_total", n, role=role)

    def _memory(self, out: _Families, deadline: float) -> None:
        used, limit = memory_use(self.r)
        if used is not None:
            out.add("redis_memory_used_bytes", used)
            out.add("redis_memory_max_bytes", limit)

    def _archive(self, out: _Families, deadline: float) -> None:
        if self.run_dir is None:
            return
        archive = Archive(self.run_dir, self.run_id)
        if not archive.dir.is_dir():
            out.add("archive_bytes", 0)
            out.add("archive_segments", 0)
            return
        with os.scandir(archive.dir) as entries:
            out.add("archive_bytes", sum(e.stat().st_size for e in entries if e.is_file()))
        out.add("archive_segments", len(archive.segments()))

    def _training(self, out: _Families, deadline: float) -> None:
        """The last training line's metrics (and the last evaluation's), from metrics.jsonl; when
        this host cannot see the file, from the newest StepCommitted (the same numbers)."""
        row, evaluation = None, None
        if self.tail is not None:
            self.tail.read()
            row, evaluation = self.tail.train, self.tail.evaluation
        if row is None and self.state is not None and self.state.last_step is not None:
            row = {"step": self.state.last_step.step, **self.state.last_step.metrics}
        if row is not None and isinstance(row.get("step"), (int, float)):
            out.add("training_metrics_step", row["step"])
        for line in (row, evaluation):
            for key, value in sorted((line or {}).items()):
                name = metric_name(key)
                if ("/" not in key or isinstance(value, bool) or not isinstance(value, (int, float))
                        or not math.isfinite(value) or name in out.families
                        or name.removeprefix(PREFIX) in NATIVE or name.removesuffix("_total") in _COUNTER_NAMES):
                    continue  # not a namespaced number, or a name already taken (the exporter's own win)
                out.gauge(name, f"metrics.jsonl {key}", float(value))


_COUNTER_NAMES = {PREFIX + n.removesuffix("_total") for n, (kind, _, _) in NATIVE.items() if kind == "counter"}


def native_names() -> set[str]:
    """Every name the exporter's own families expose (counters with their ``_total``)."""
    return {PREFIX + n for n in NATIVE}


# --------------------------------------------------------------------------- serving
def exporter_client(url: str, password: str | None) -> redis.Redis:
    """A client that fails fast: no retries, short timeouts (a scrape is bounded)."""
    return redis.Redis.from_url(url, password=password, socket_connect_timeout=SOCKET_TIMEOUT_S,
                                socket_timeout=SOCKET_TIMEOUT_S, decode_responses=False)


class Exporter:
    """An HTTP server serving ``/metrics`` for one run, on a daemon thread."""

    def __init__(self, collector: RunCollector, host: str, port: int):
        from prometheus_client import start_http_server

        self.collector = collector
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)
        self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        self.host, self.port = host, self.server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.collector.r.close()


def start_exporter(cfg, url: str, password: str | None, run_dir: Path) -> Exporter | None:
    """`rlstream up`'s exporter when ``metrics.port`` is set (else None)."""
    if cfg.metrics.port is None:
        return None
    exporter = Exporter(RunCollector(cfg, exporter_client(url, password), run_dir), cfg.metrics.host,
                        cfg.metrics.port)
    log.info("metrics at %s", exporter.url)
    return exporter


def metrics_main(run: str, log_path: str, host: str, port: int) -> int:
    """``rlstream metrics RUN``: serve the run's metrics until interrupted. The run's Redis is never
    started here (that is `rlstream up`'s or the operator's): while it is down, ``rlstream_redis_up`` is 0."""
    import signal

    from rlstream.core.config import validate_config
    from rlstream.core.credentials import PASSWORD_ENV
    from rlstream.core.embedded_redis import stored_password
    from rlstream.core.errors import ConfigError
    from rlstream.core.lifeline import raise_interrupt
    from rlstream.ops.status import find_run_dir

    run_dir = find_run_dir(run, log_path)
    cfg = validate_config(json.loads((run_dir / "config.json").read_text()))
    if not cfg.redis.url:
        raise ConfigError(f"{run_dir}/config.json has no redis.url")
    password = os.environ.get(PASSWORD_ENV) or stored_password(run_dir / "redis")
    exporter = Exporter(RunCollector(cfg, exporter_client(cfg.redis.url, password), run_dir), host, port)
    print(f"rlstream: serving run {cfg.run_id}'s metrics (redis {redacted(cfg.redis.url)}) at {exporter.url}",
          flush=True)
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        exporter.close()
