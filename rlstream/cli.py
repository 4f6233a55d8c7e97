"""``rlstream`` command line. Parses and validates the config before importing torch, so
``--help`` and config errors are instant (exit 2, nothing started)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import traceback
from pathlib import Path

import redis

from rlstream.core.errors import ConfigError, RedisUnavailable, RlstreamError

log = logging.getLogger(__name__)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML config file (or a run's resolved config.json)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field (repeatable; dotted for tables: redis.url=...)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlstream", description="Asynchronous GRPO-family RL on Redis streams.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run everything on this machine: redis, producer, workers, trainer")
    _config_args(up)
    up.add_argument("--run-id", help="run id (default: generated)")
    for role, text in [("producer", "admit prompt groups and enqueue rollout jobs"),
                       ("worker", "run rollout jobs with the current policy"),
                       ("trainer", "consume rollouts, train, publish weights")]:
        _config_args(sub.add_parser(role, help=text))
    replay = sub.add_parser("replay", help="train a fresh model (CONFIG) on a recorded run's committed samples")
    replay.add_argument("source", help="the recorded run: its directory or id")
    _config_args(replay)
    replay.add_argument("--run-id", help="the replay's run id (default: generated)")
    replay.add_argument("--source-log-path", default="runs", help="directory holding the source run (for an id)")
    status = sub.add_parser("status", help="versions, streams, pending, workers, last reward of a run")
    status.add_argument("run", nargs="?", help="run directory or run id (default: newest under --log-path)")
    status.add_argument("--log-path", default="runs", help="directory holding run directories")
    status.add_argument("--json", action="store_true",
                        help="one JSON object: backlog and rates for scripts, autoscalers")
    report = sub.add_parser("report",
                            help="an HTML page of a run's plots: reward, offsets, throughput, step time, eval")
    report.add_argument("run", nargs="?", help="run directory or run id (default: newest under --log-path)")
    report.add_argument("--log-path", default="runs", help="directory holding run directories")
    report.add_argument("--out", help="where to write the page (default: RUN/report.html)")
    for name, text in [("audit",
                        "check the sample ledger: every admitted group trained once or rejected; exit 1 if not"),
                       ("dead", "list the dead-letter stream: entry id, source entry id, reason")]:
        p = sub.add_parser(name, help=text)
        p.add_argument("run", nargs="?", help="run directory or run id (default: newest under --log-path)")
        p.add_argument("--log-path", default="runs", help="directory holding run directories")
    metrics = sub.add_parser("metrics", help="serve a run's Prometheus metrics on /metrics (for runs started role "
                             "by role; `rlstream up` serves them itself with metrics.port set)")
    metrics.add_argument("run", help="run directory or run id")
    metrics.add_argument("--log-path", default="runs", help="directory holding run directories")
    metrics.add_argument("--port", type=int, default=9877, help="port to serve on (default 9877; 0 = any free port)")
    metrics.add_argument("--host", default="127.0.0.1",
                         help="address to bind (default 127.0.0.1; 0.0.0.0 for a Prometheus on another host)")
    alive = sub.add_parser("worker-alive", help="liveness probe of a worker container: exit 0 while a worker of "
                           "this run on this host sends rq heartbeats")
    _config_args(alive)
    alive.add_argument("--max-age", type=float, default=60.0,
                       help="seconds since the last heartbeat that still count as alive (default 60)")
    export = sub.add_parser("export", help="write every trained sample of a run as JSON lines (archive + stream)")
    export.add_argument("run", nargs="?", help="run directory or run id (default: newest under --log-path)")
    export.add_argument("--out", required=True, help="output file (written whole, then renamed into place)")
    export.add_argument("--format", default="jsonl", choices=["jsonl"], help="one JSON object per trained sample")
    export.add_argument("--log-path", default="runs", help="directory holding run directories")
    return parser


def _load_config(args: argparse.Namespace):
    from rlstream.core.config import load_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "run_id", None):
        cfg = cfg.model_copy(update={"run_id": args.run_id})
    return cfg


def _setup_logging(role: str) -> None:
    logging.basicConfig(level=os.environ.get("RLSTREAM_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s %(levelname)s [{role}] %(name)s: %(message)s", force=True)


def _connect(cfg):
    """A client for a standalone process. Its password: in redis.url, else in
    RLSTREAM_REDIS_PASSWORD, else (a worker attached to an `up` run with the embedded
    server, on the same machine) that server's password file in the run directory."""
    from rlstream.core.connection import connect
    from rlstream.core.embedded_redis import stored_password

    if not cfg.redis.url:
        raise ConfigError("config error: redis.url: not set; `rlstream up` starts an embedded Redis, a standalone "
                          "process needs redis.url or RLSTREAM_REDIS_URL")
    password = stored_password(cfg.run_dir() / "redis") if cfg.run_id else None
    return connect(cfg.redis.url, cfg.redis.connect_timeout, password=password)


def _require_run_id(cfg) -> None:
    if not cfg.run_id:
        raise ConfigError("config error: run_id: a standalone process needs run_id (config or RLSTREAM_RUN_ID)")


def _user_import_path(config_path: str | None) -> None:
    """User code is named as 'module:function' (rollout factories, rewards, hooks). Under
    ``python -m`` the working directory is on sys.path; under the ``rlstream`` console
    script it is not, so add it (and the config file's directory) the same way."""
    for path in (os.getcwd(), os.path.dirname(os.path.abspath(config_path)) if config_path else None):
        if path and path not in sys.path:
            sys.path.append(path)


def _lost_redis(cfg, exc: Exception) -> RedisUnavailable:
    from rlstream.core.credentials import redacted

    return RedisUnavailable(f"lost Redis at {redacted(cfg.redis.url)} and could not reconnect within the bounded "
                            f"retries ({exc}); restart the server (with its AOF, nothing acknowledged is lost) and "
                            "restart this process: it resumes from the streams")


def run(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    _user_import_path(getattr(args, "config", None))
    if args.command == "status":
        from rlstream.ops.status import status_main

        return status_main(args.run, args.log_path, as_json=args.json)
    if args.command == "report":
        from rlstream.ops.report import report_main

        return report_main(args.run, args.log_path, args.out)
    if args.command == "audit":
        from rlstream.ops.audit import audit_main

        return audit_main(args.run, args.log_path)
    if args.command == "export":
        from rlstream.ops.export import export_main

        return export_main(args.run, args.log_path, args.out)
    if args.command == "metrics":
        _setup_logging("metrics")
        from rlstream.ops.metrics_exporter import metrics_main

        return metrics_main(args.run, args.log_path, args.host, args.port)
    if args.command == "dead":
        from rlstream.ops.dead import dead_main

        return dead_main(args.run, args.log_path)
    cfg = _load_config(args)
    _setup_logging(args.command)
    if args.command == "replay":
        return _replay(args, cfg, argv)
    if args.command == "up":
        from rlstream.launcher import up

        return up(cfg)
    _require_run_id(cfg)
    if args.command == "worker-alive":
        from rlstream.ops.liveness import worker_alive_main

        return worker_alive_main(_connect(cfg), cfg.run_id, args.max_age)
    from rlstream import torchrun

    if args.command == "trainer":
        _start_ranks(cfg, argv)  # several ranks: this process becomes torchrun's agent (no return)
    if torchrun.under_torchrun():
        torchrun.watch_agent()  # a rank exits when torchrun's agent is gone
        if torchrun.rank() != 0:  # docs/design.md §15.82 Rank 0 speaks for the trainer's ranks
            return _run_role(args.command, cfg, None)
    else:
        from rlstream.core.lifeline import watch_supervisor_from_env

        watch_supervisor_from_env()  # a child of `rlstream up` exits when up is gone
    r = _connect(cfg)
    try:
        return _run_role(args.command, cfg, r)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise _lost_redis(cfg, exc) from exc


def _start_ranks(cfg, argv: list[str]) -> None:
    """With ``trainer.nproc_per_node * trainer.nnodes > 1`` (and not a rank already): check the
    ranks' settings, then become torchrun's agent running ``rlstream <argv>`` on every rank."""
    from rlstream import torchrun

    if torchrun.launches(cfg.trainer):
        from rlstream.preflight import check_ranks

        check_ranks(cfg)
        torchrun.exec_ranks(cfg.trainer, cfg.run_id, argv)


def _replay(args: argparse.Namespace, cfg, argv: list[str]) -> int:
    from rlstream import torchrun
    from rlstream.core.config import new_run_id
    from rlstream.ops.status import opened_run

    if not cfg.run_id:  # one id for every rank: chosen before they start
        cfg = cfg.model_copy(update={"run_id": new_run_id()})
        argv = [*argv, "--run-id", cfg.run_id]
    _start_ranks(cfg, argv)
    if torchrun.under_torchrun():
        torchrun.watch_agent()
        if torchrun.rank() != 0:  # the source run is rank 0's to read; this rank follows it
            from rlstream.trainer.ranks import collectives_bounded
            from rlstream.trainer.replay_run import follow_replay

            with collectives_bounded(cfg.trainer.collective_timeout):
                follow_replay(cfg)
            return 0
    with opened_run(args.source, args.source_log_path) as (source_dir, source_cfg, r):
        from rlstream.trainer.ranks import collectives_bounded
        from rlstream.trainer.replay_run import replay_run

        with collectives_bounded(cfg.trainer.collective_timeout):
            steps = replay_run(cfg, r, source_cfg.run_id, source_dir, source_cfg)
    print(f"replayed {steps} steps of run {source_cfg.run_id} into {cfg.run_dir()}", flush=True)
    return 0


def _run_role(command: str, cfg, r) -> int:
    """Exit code of one standalone process: 1 when the trainer ended the run as failed."""
    if command == "producer":
        from rlstream.producers.producer import run_producer

        run_producer(cfg, r)
    elif command == "worker":
        from rlstream.workers.main import run_worker

        run_worker(cfg, r, worker_id=f"{socket.gethostname()}-{os.getpid()}")
    elif command == "trainer":
        from rlstream.core.lifeline import raise_interrupt
        from rlstream.trainer.trainer import Trainer

        # SIGTERM (`rlstream up` stopping it, docker stop) unwinds like Ctrl-C, so the trainer
        # releases its lease and a successor starts at once instead of after one lease TTL.
        signal.signal(signal.SIGTERM, raise_interrupt)
        from rlstream.trainer.ranks import close, collectives_bounded

        with collectives_bounded(cfg.trainer.collective_timeout):  # a hung rank ends the group, with the reason
            trainer = Trainer(cfg, r, cfg.run_dir())  # r None: a rank other than 0, following rank 0
            trainer.run()
        close(trainer.ranks)
        if trainer.ranks.rank != 0:
            return 0
        finished = trainer.state.finished
        if finished is not None and finished.failed:
            print(f"rlstream: run failed: {finished.reason}", file=sys.stderr)
            return 1
    return 0


def entrypoint() -> None:
    from rlstream import torchrun  # no torch: what tells a torchrun rank, which ends its own way (end_rank)

    try:
        code = run()
    except RlstreamError as exc:
        print(f"rlstream: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    except BaseException as exc:  # noqa: BLE001 - a full disk met by a writer without its own space_guard
        from rlstream.core.disk import DiskFull, disk_full_error, message, redis_refusal

        full, refused = disk_full_error(exc), redis_refusal(exc)
        if full is None and refused is None:
            if torchrun.under_torchrun() and not isinstance(exc, SystemExit):
                traceback.print_exc()  # what the interpreter would print, then exit 1 without finalization
                torchrun.end_rank(1)  # (there gloo's threads can abort the rank: -6 instead of 1)
            raise
        log.error("no space left on device", exc_info=exc)
        # A role's command line names its run's config.json; the embedded server keeps its data beside it.
        config = next((Path(a) for a in sys.argv[1:] if a.endswith("config.json")), None)
        redis_dir = config.parent / "redis" if config is not None and (config.parent / "redis").is_dir() else None
        where = redis_dir.resolve() if redis_dir else "runs/<id>/redis"
        said = message(Path(full.filename or os.getcwd()), "to", 0) if full is not None else (
            f"Redis refuses writes ({refused}): free space on the disk where it keeps its data (the embedded "
            f"server's: {where})")
        print(f"rlstream: {said}", file=sys.stderr)
        code = DiskFull.exit_code
    if torchrun.under_torchrun():  # a rank: its process group closed, it ends without finalization
        torchrun.end_rank(code)
    sys.exit(code)


if __name__ == "__main__":
    entrypoint()
