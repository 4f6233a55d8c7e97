"""``rlstream up``: embedded Redis (unless ``redis.url``), then producer, N workers and the
trainer as child processes, a live progress display, clean shutdown.

Children run ``python -m rlstream.cli <role> runs/<id>/config.json`` in their own
session (so a terminal's Ctrl-C reaches only us; we forward SIGTERM), with output in
``runs/<id>/logs/<role>.log``. The run directory is owner-only (0700); config.json and
the RunStarted event hold the Redis URL without its password, which children get in
their environment (``RLSTREAM_REDIS_PASSWORD``), never on a command line or in a file.
Supervision: a crashed child (or the embedded redis-server) is restarted with backoff; the
run gives up on it only on a crash loop (``rlstream.restart_policy``: crashes soon after each start
with no step committed in between), never on a lifetime count; every restart is logged. With
``inference.launch`` the inference servers are children too (``rlstream.engine_launch``):
started once the trainer has published v0, on the newest published weights, before the
producer and workers; restarted under the same policy and stopped, process group and all,
after the workers. The children and redis-server die with us, even when we are
SIGKILLed (``core.lifeline``). A trainer of several ranks (``trainer.nproc_per_node``) is the
same child, which replaces itself with torchrun's agent (``rlstream.torchrun``): it dies with
us, its ranks die with it, and a dead rank ends the group, which is restarted as one child. Exit
code: 0 when the trainer finished the run, 1 when a child kept failing (its last log lines
are printed) or the run failed (e.g. the rollout circuit breaker), 130 on Ctrl-C.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

import rlstream.engine_launch as engine_launch
from rlstream.core import bus, keys, weights
from rlstream.core.config import Config, env_override_names, new_run_id
from rlstream.core.connection import client, connect
from rlstream.core.cookbook_config import ignored_settings, kept_differences
from rlstream.core.credentials import PASSWORD_ENV, private_dir, redacted, url_password
from rlstream.core.disk import DiskFull, aof_refusal
from rlstream.core.embedded_redis import EmbeddedRedis
from rlstream.core.errors import ConfigError, RedisUnavailable, RunFailed
from rlstream.core.fold_snapshot import start_fold
from rlstream.core.imports import script_functions
from rlstream.core.lifeline import SUPERVISOR_ENV, die_with_parent, raise_interrupt
from rlstream.core.memory_guard import embedded_maxmemory_mb
from rlstream.core.messages import RunStarted
from rlstream.core.metrics import read_metrics, summary_line
from rlstream.core.run_state import RunState
from rlstream.engine_launch import EngineServer
from rlstream.forked import fork_role
from rlstream.ops.progress import Progress
from rlstream.ops.restarts import RestartLog
from rlstream.preflight import preflight
from rlstream.restart_policy import RestartPolicy, check_settings
from rlstream.sampling.remote import redis_sync_lock

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 30.0


@dataclass
class Child:
    name: str
    role: str
    process: subprocess.Popen
    log_path: Path
    restart_at: float | None = None  # scheduled restart (backoff), None when running
    redis_password: str | None = field(default=None, repr=False)
    policy: RestartPolicy = None  # type: ignore[assignment]  # set in __post_init__: named after the child

    def __post_init__(self) -> None:
        if self.policy is None:
            self.policy = RestartPolicy(self.name)

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def _child_env(redis_password: str | None = None) -> dict[str, str]:
    """Children import user code by name (rollout factories, rewards, hooks): give them our
    import path, as multiprocessing's spawn does, so a module next to the user's script
    resolves in the workers too. ``RLSTREAM_<FIELD>`` overrides are dropped: they are
    already resolved into config.json, and re-applying them in a child would undo a
    ``--set`` or ``--run-id`` that beat them here. The Redis password (config.json holds
    the URL without it) travels in ``RLSTREAM_REDIS_PASSWORD``.

    The directory that holds *this* ``rlstream`` comes first: children run with ``-P`` (no
    working directory in front), so a source checkout in the working directory (a
    ``rlstream/`` folder without the role packages, which install inside it) can never
    shadow the installed package a child must import."""
    home = str(Path(__file__).resolve().parents[1])  # the directory holding this rlstream package
    paths = [home] + [p or os.getcwd() for p in sys.path]
    overrides = env_override_names() | {PASSWORD_ENV}
    env = {k: v for k, v in os.environ.items() if k not in overrides}
    if redis_password:
        env[PASSWORD_ENV] = redis_password
    return {**env, "PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in paths if os.path.isdir(p))),
            SUPERVISOR_ENV: str(os.getpid())}


def forks(role: str, held: dict) -> bool:
    """Whether a child of ``role`` must be forked from this process: it runs a function that
    only this process holds (``rlstream.main`` with a lambda or a function of the script). The
    trainer runs every hook (the rollout factory too, for ``ctx.rollout_fn`` in evaluations);
    the workers run the rollout factory; the producer runs none."""
    return bool(held) and (role == "trainer" or (role == "worker" and "rollout_fn_factory" in held))


def _spawn(name: str, role: str, config_path: Path, logs: Path, redis_password: str | None) -> Child:
    log_path = logs / f"{name}.log"
    if forks(role, script_functions()):  # functions only this process holds: fork the child from here
        # (docs/design.md §15.61 Script hooks run in a forked trainer)
        forked = fork_role(role, config_path, log_path, _child_env(redis_password), die_with_parent(signal.SIGKILL))
        return Child(name, role, forked, log_path, redis_password=redis_password)  # type: ignore[arg-type]
    out = log_path.open("ab")
    process = subprocess.Popen([sys.executable, "-P", "-m", "rlstream.cli", role, str(config_path)],
                               stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, env=_child_env(redis_password),
                               # SIGKILL when we die (even by SIGKILL): crash-safe by design, and nothing
                               # would supervise them any more. The child also watches our pid (lifeline).
                               preexec_fn=die_with_parent(signal.SIGKILL))
    out.close()
    return Child(name, role, process, log_path, redis_password=redis_password)


def _stop(children: list[Child], grace: float) -> None:
    for c in children:
        if c.process.poll() is None:
            c.process.terminate()
    deadline = time.monotonic() + grace
    for c in children:
        try:
            c.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs: killing it", c.name, grace)
            c.process.kill()
            c.process.wait()


def up(cfg: Config) -> int:
    check_settings()  # a bad RLSTREAM_MAX_RESTARTS or RLSTREAM_MIN_UPTIME_S fails now, not at the first crash
    preflight(cfg)
    if cfg.trainer.world_size > 1 and forks("trainer", script_functions()):
        raise ConfigError(f"config error: trainer.nproc_per_node = {cfg.trainer.nproc_per_node}: the trainer's ranks "
                          "are started by torchrun, which cannot carry functions that only this script holds (a "
                          f"lambda or a function of __main__: {', '.join(sorted(script_functions()))}); move them "
                          "into a module and name them 'module:function'")
    if cfg.inference.launch:
        engine_launch.validate(cfg)  # a bad URL or a repeated flag fails now, before anything starts
    if ignored := ignored_settings(cfg):  # once per run, here: children load the same config again
        log.warning("ignored (only a hosted service can honour them): %s", "; ".join(ignored))
    if kept := kept_differences(cfg):  # likewise once: the defaults that are not the cookbook's, on purpose
        log.info("rlstream defaults that differ from the cookbook's: %s", "; ".join(kept))
    cfg = cfg.model_copy(update={"run_id": cfg.run_id or new_run_id()})
    run_dir = cfg.run_dir()
    started = time.monotonic()
    embedded = EmbeddedRedis(run_dir / "redis", embedded_maxmemory_mb(cfg.redis.maxmemory_mb)) \
        if cfg.redis.url is None else None
    children: list[Child] = []
    engines: list[EngineServer] = []
    http = httpx.Client(timeout=engine_launch.HEALTH_TIMEOUT)  # health probes and checks of the inference servers
    # `kill <pid of up>` must stop the children too: they run in their own sessions, so
    # nothing else would reach them, and a SIGTERM would otherwise skip every `finally`.
    previous_handler = signal.signal(signal.SIGTERM, raise_interrupt)
    grace = 5.0  # for children still running when something unexpected escapes
    exporter = None  # the run's Prometheus exporter (metrics.port; docs/operating.md)
    try:
        if cfg.inference.remote and not cfg.inference.launch:  # someone else's servers: there, and right?
            engine_launch.check_external(cfg, http)
        if embedded:
            private_dir(run_dir)  # owner-only before the server writes its AOF and password in it
        url = embedded.start() if embedded else cfg.redis.url
        connect(url, cfg.redis.connect_timeout)  # fail fast and clearly, before making the run dir
        private_dir(run_dir)  # (log_path above it is the user's: created if missing, never chmod-ed)
        private_dir(run_dir / "logs")
        # Our own client does not retry: the supervisor must notice a dead Redis at once.
        r = client(url, command_retries=0)
        password = url_password(url) or os.environ.get(PASSWORD_ENV)
        resolved = cfg.model_copy(update={"redis": cfg.redis.model_copy(update={"url": url})})
        config_path = run_dir / "config.json"
        # model_dump drops the password from the URL (RedisConfig's serializer)
        config_path.write_text(json.dumps(resolved.model_dump(mode="json"), indent=1))
        bus.xadd(r, keys.events(cfg.run_id), RunStarted(run_id=cfg.run_id, config=resolved.model_dump(mode="json")))
        log.info("run %s in %s (redis %s)", cfg.run_id, run_dir, redacted(url))
        if cfg.metrics.port is not None:  # prometheus_client is imported only when asked for
            from rlstream.ops.metrics_exporter import start_exporter

            exporter = start_exporter(resolved, url, password, run_dir)
        if cfg.workers.count == 0:
            log.warning("workers.count = 0: nothing samples until you start `rlstream worker %s`", config_path)
        logs = run_dir / "logs"
        watch = Watch(cfg, r, children, [], config_path, embedded, http)
        children.append(_spawn("trainer", "trainer", config_path, logs, password))
        if cfg.inference.launch:  # the engines serve the trainer's first published weights
            _launch_engines(watch, logs, engines)
        children.append(_spawn("producer", "producer", config_path, logs, password))
        children += [_spawn(f"worker-{i}", "worker", config_path, logs, password) for i in range(cfg.workers.count)]
        for c in children:  # a continued run starts with its steps: a crash before the next one is quick
            c.policy.started(watch.state.steps)
        _supervise(watch, Progress(cfg, sys.stdout))
        _stop(children, SHUTDOWN_GRACE_S)  # before the summary: metrics.jsonl is complete then
        _stop_engines(engines, SHUTDOWN_GRACE_S)
        print(summary_line(read_metrics(run_dir / "metrics.jsonl"), time.monotonic() - started), flush=True)
        return 0
    except RunFailed as exc:
        print(f"rlstream: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("rlstream: interrupted; stopping children", file=sys.stderr, flush=True)
        grace = 10.0
        return 130
    finally:
        # A second Ctrl-C or SIGTERM must not cut the (bounded) cleanup short and orphan
        # children that live in their own sessions.
        interrupt_handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _stop(children, grace)  # no-op for children already stopped
        _stop_engines(engines, grace)  # after the workers: nothing is sampling any more
        http.close()
        if exporter is not None:  # before the embedded server it reads stops
            exporter.close()
        if embedded is not None:
            embedded.stop()
        signal.signal(signal.SIGINT, interrupt_handler)
        signal.signal(signal.SIGTERM, previous_handler)


def _restart_child(c: Child, config_path: Path, state: RunState) -> None:
    restarted = _spawn(c.name, c.role, config_path, c.log_path.parent, c.redis_password)
    c.process, c.restart_at = restarted.process, None
    c.policy.started(state.steps)
    log.warning("restarted %s (pid %d, restart %d of this run)", c.name, c.process.pid, c.policy.restarts)


def _check_child(c: Child, state: RunState, config_path: Path) -> None:
    """Restart a crashed child after its back-off; fail the run on a crash loop (``restarts``)."""
    if c.restart_at is not None:
        if time.monotonic() >= c.restart_at:
            _restart_child(c, config_path, state)
        return
    code = c.process.poll()
    if code is None or (code == 0 and (c.role != "trainer" or state.finished is not None)):
        return
    if state.finished is not None:  # shutting down anyway
        return
    if code == DiskFull.exit_code:  # no space left: a restart would only crash into the same full disk
        said = next((line for line in reversed(c.tail(40).splitlines()) if line.startswith("rlstream: ")), "")
        raise RunFailed(f"{c.name} stopped: {said.removeprefix('rlstream: ') or 'no space left on device'}. "
                        f"Once there is space, `rlstream up CONFIG --run-id {config_path.parent.name}` continues "
                        "the run")
    try:
        delay = c.policy.crashed(state.steps, f"exited with code {code}")
    except RunFailed as exc:
        raise RunFailed(f"{exc}; last lines of {c.log_path}:\n{c.tail()}") from None
    log.warning("%s exited with code %s; restarting in %.0fs (%s)", c.name, code, delay, c.policy.note)
    c.restart_at = time.monotonic() + delay


def _check_redis(embedded: EmbeddedRedis | None, policy: RestartPolicy, state: RunState) -> None:
    """Restart a dead embedded redis-server from its AOF; fail the run on a crash loop. A start
    that fails (e.g. killed again while loading) counts as a quick crash and is retried on the
    next pass, so a crash loop, not the first mishap, ends the run. No back-off: every role
    waits for Redis meanwhile."""
    if embedded is None or embedded.alive():
        return
    try:
        policy.crashed(state.steps, "died")
    except RunFailed as exc:
        raise RunFailed(f"{exc}; its log:\n{embedded.log_tail()}") from None
    log.warning("embedded redis-server died; restarting it from its AOF (%s)", policy.note)
    policy.started(state.steps)
    try:
        embedded.start()
    except RedisUnavailable as exc:
        log.warning("embedded redis-server restart failed: %s", exc)


LOST_LOG_EVERY_S = 30.0


class Watch:
    """What the supervisor follows: the events (its fold), the children, the engines, Redis.
    ``step`` is one pass, shared by the wait for the engines and the run's main loop."""

    def __init__(self, cfg: Config, r, children: list[Child], engines: list[EngineServer], config_path: Path,
                 embedded: EmbeddedRedis | None, http: httpx.Client):
        self.cfg, self.r, self.children, self.engines = cfg, r, children, engines
        self.config_path, self.embedded, self.http = config_path, embedded, http
        # docs/design.md §15.47 Processes start from the checkpoint's fold (a continued run's history)
        self.state, self.cursor = start_fold(cfg.run_dir(), r, cfg.run_id)
        self.redis_policy = RestartPolicy("the embedded redis-server", steps_at_start=self.state.steps)
        self.restart_log = RestartLog(cfg.run_id)  # restarts by role, for the metrics (observed, not counted here)
        self.disk_checked_at = 0.0
        self.redis_lost: tuple[float, float, int] | None = None  # (since, last logged, failed reads) of an outage

    def _redis_lost(self, exc: Exception) -> None:
        """Log an outage when it starts and every LOST_LOG_EVERY_S while it lasts, not at every
        pass (two a second: a flaky network filled the log with them)."""
        now = time.monotonic()
        since, logged, failures = self.redis_lost or (now, 0.0, 0)
        if now - logged >= LOST_LOG_EVERY_S:
            log.warning("lost Redis while following events (%s)%s", exc,
                        f"; {failures + 1} failed reads in {now - since:.0f} s" if failures else "")
            logged = now
        self.redis_lost = (since, logged, failures + 1)

    def _check_redis_disk(self) -> None:
        """Stop the run when the embedded server cannot write its AOF (a full disk): every role
        would otherwise crash on its next write, into a crash loop (rlstream.core.disk)."""
        if self.embedded is None or time.monotonic() < self.disk_checked_at + 1.0:
            return
        self.disk_checked_at = time.monotonic()
        try:
            refusal = aof_refusal(self.r, self.embedded.directory)
        except (redis.ConnectionError, redis.TimeoutError):
            return
        if refusal:
            raise RunFailed(f"{refusal}. Once there is space, `rlstream up CONFIG --run-id {self.cfg.run_id}` "
                            "continues the run (writes the server took but could not log are lost as in an OS "
                            "crash, which the run recovers from)")

    def step(self, progress: Progress | None = None) -> None:
        """Follow events (blocking at most 0.5 s), keep children, engines and Redis alive; raise
        ``RunFailed`` when the run cannot go on."""
        _check_redis(self.embedded, self.redis_policy, self.state)
        self._check_redis_disk()
        try:
            entries, self.cursor = bus.read_events(self.r, self.cfg.run_id, self.cursor, block_ms=500)
            for _, msg in entries:
                self.state.apply(msg)
            if progress is not None:
                progress.update(self.state, self.r)
            if self.redis_lost is not None:
                log.info("Redis is back after %.0f s", time.monotonic() - self.redis_lost[0])
                self.redis_lost = None
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            self._redis_lost(exc)
            time.sleep(0.2)
        for c in self.children:
            _check_child(c, self.state, self.config_path)
        for e in self.engines:
            _check_engine(e, self.state, self.http)
        self.restart_log.observe(self.r, self.children, self.engines, self.embedded)
        if self.state.finished is not None and self.state.finished.failed:
            raise RunFailed(f"run failed: {self.state.finished.reason}")


def _supervise(watch: Watch, progress: Progress) -> RunState:
    """Follow events for the display, keep children, engines and Redis alive; return when the
    trainer has finished the run (raise ``RunFailed`` when the run cannot go on)."""
    trainer = next(c for c in watch.children if c.role == "trainer")
    with progress:
        while True:
            watch.step(progress)
            if watch.state.finished is not None and trainer.process.poll() is not None:
                return watch.state


def _newest_published(watch: Watch) -> int:
    published = watch.state.latest_weights
    return engine_launch.newest_complete(watch.cfg.run_dir() / "weights", published.version if published else 0)


def _launch_engines(watch: Watch, logs: Path, launched: list[EngineServer]) -> None:
    """Start one server per base_url on the trainer's newest published weights (v0 on a new
    run), wait for their health and check them, all bounded by ``inference.start_timeout``
    while the trainer stays supervised (docs/design.md §15.72 `up` launches and supervises the engine)."""
    cfg, bound = watch.cfg, watch.cfg.inference.start_timeout
    deadline = time.monotonic() + bound
    log.info("waiting (at most %.0fs) for the trainer to publish v0, which the %s servers will serve",
             bound, cfg.inference.backend)
    weights_root = cfg.run_dir() / "weights"
    while watch.state.latest_weights is None or not (
            weights.version_dir(weights_root, watch.state.latest_weights.version) / weights.MANIFEST).is_file():
        if time.monotonic() > deadline:
            raise RunFailed(f"the trainer published no weights within inference.start_timeout = {bound:.0f}s, so "
                            f"there is nothing to start {cfg.inference.backend} on: see {logs / 'trainer.log'}")
        watch.step()
    version = watch.state.latest_weights.version
    # the workers' sync lock, never waited for: a worker holding it labels the server itself
    lock = redis_sync_lock(watch.r, cfg.run_id, cfg.inference.weight_sync_timeout, wait=0)
    servers = [EngineServer(cfg, i, url, logs, sync_lock=lock) for i, url in enumerate(cfg.inference.base_urls)]
    launched.extend(servers)  # stopped with the run from now on, whatever happens next
    for s in servers:
        s.start(version)
        s.policy.started(watch.state.steps)
    log.info("waiting (at most %.0fs) for %d %s server(s) to answer /health", bound, len(servers),
             cfg.inference.backend)
    engine_launch.wait_until_up(servers, watch.http, watch.step)  # a first start that fails ends `up`
    engine_launch.check_servers(cfg, watch.http)
    watch.engines.extend(servers)  # supervised (restarted when they die) from now on
    log.info("%s up at %s", cfg.inference.backend, ", ".join(cfg.inference.base_urls))


def _check_engine(e: EngineServer, state: RunState, http: httpx.Client) -> None:
    """Restart a dead (or never healthy) engine after its back-off on the newest published
    weights, failing the run on a crash loop as ``_check_child`` does for children (a server
    that never answered its health check crashed quickly, however long its start took); workers
    wait for it meanwhile (docs/design.md §15.72 `up` launches and supervises the engine)."""
    if state.finished is not None:  # shutting down anyway
        return
    if e.restart_at is not None:
        if time.monotonic() >= e.restart_at:
            published = state.latest_weights.version if state.latest_weights else 0
            e.restart_at = None
            e.start(engine_launch.newest_complete(e.weights_root, published))
            e.policy.started(state.steps)
            log.warning("restarted %s (pid %d, restart %d of this run)", e.name, e.process.pid, e.policy.restarts)
        return
    code = e.poll()
    if code is None:
        if e.probe(http) or not e.overdue():
            return
        reason = f"did not answer {e.root}/health within inference.start_timeout = {e.cfg.inference.start_timeout:.0f}s"
    else:
        reason = f"exited with code {code}"
    came_up = not e.coming_up
    e.kill_group()  # what is left of it (vLLM's EngineCore and Worker are forks in its group)
    try:
        delay = e.policy.crashed(state.steps, f"({e.url}) {reason}", came_up=came_up)
    except RunFailed as exc:
        raise RunFailed(f"{exc}; last lines of {e.log_path}:\n{e.tail()}") from None
    log.warning("%s (%s) %s; restarting it in %.0fs (workers wait for it; %s)", e.name, e.url, reason, delay,
                e.policy.note)
    e.restart_at = time.monotonic() + delay


def _stop_engines(engines: list[EngineServer], grace: float) -> None:
    for e in engines:
        e.stop(grace)
