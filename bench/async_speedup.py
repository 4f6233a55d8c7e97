"""Asynchronous vs synchronous training, the same steps, against a stand-in inference server with
a long-tail latency and against one without a tail (the same mean latency, fixed); next to the
theoretical bound of each. Also the trainer's idle share (benchmark 4) for every run, and the
requests in flight over time (the stand-in server's histogram of seconds at each count: their mean
while any is in flight, and the share of that time at the worker's window).

Run (from the repository root, in the project's venv)::

    python bench/async_speedup.py                    # defaults below (docs/benchmarks.md's run), ~5 min on 2 cores
    python bench/async_speedup.py --steps 20 --workers 8 --rounds 2
    # issue 20's long-tail case: one worker, window 64, 90% of requests 0.2 s and 10% 2 s
    python bench/async_speedup.py --tail mix:0.2,2.0,0.1 --skip-flat --workers 1 --groups 8 --group-size 8 \
        --groups-per-worker 8 --steps 30
    # two checkouts side by side in one run (each with its own venv): LABEL=PYTHON, runs interleaved
    python bench/async_speedup.py ... --python old=/tmp/old/.venv/bin/python --python new=.venv/bin/python

Every run is a real ``rlstream up`` of the built-in task (tiny model, trained for real) with
``inference.backend = "openai"`` pointed at bench/latency_server.py (started in a thread of
this process; it also takes the weight syncs), on one embedded redis-server shared by all runs.
The two modes differ only in ``synchronous_training`` (true: O = 0, every batch sampled by
the weights of the step before it; false: O = ``--offpolicy``). The runs alternate sync/async
(the order flips every round) so that load from other processes hits both alike. The workers'
window is fixed (``--concurrency-control fixed``, ``inference.max_concurrency`` requests) unless
told otherwise, so that the window under test is the one the table names.

What is timed: the wall time of steps 2..N, the sum of the trainer's ``perf/step_wall_time``
(the time between its first and last metrics line), so process start-up and model loading,
identical in both modes, are left out. Idle share = sum of ``perf/trainer_wait_for_sampler_time``
over that sum.

The theoretical bound of the speedup, for the latency distribution and the trainer's measured
compute time per step (``c``, from the synchronous run: wall - wait), with W = K * G request slots
(a worker's window is one of requests, docs/design.md §15.73 A request-level window): a synchronous step takes at least
``c`` + the time its P * G requests take on W slots (each request to the slot that frees first;
Monte Carlo over the same distribution); an asynchronous step at least
max(``c``, P * G * E[latency] / W) (the window never idles, the trainer never waits).
"""
from __future__ import annotations

import argparse
import heapq
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency_server import LatencyServer, parse_latency  # noqa: E402

from rlstream.core.embedded_redis import EmbeddedRedis  # noqa: E402
from rlstream.core.metrics import read_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "builtin" / "config.toml"


def in_flight_figures(seconds: dict[int, float], window: int) -> tuple[float, float]:
    """(mean requests in flight while any is, share of that time at ``window`` or more) from the
    server's seconds at each in-flight count."""
    busy = {level: t for level, t in seconds.items() if level > 0}
    total = sum(busy.values())
    if total <= 0:
        return 0.0, 0.0
    return (sum(level * t for level, t in busy.items()) / total,
            sum(t for level, t in busy.items() if level >= window) / total)


def run_once(workdir: Path, redis_url: str, server: LatencyServer, run_id: str, args, synchronous: bool,
             python: str = sys.executable) -> dict:
    """One ``rlstream up`` (run by ``python``); the figures of its steps 2..N."""
    overrides = {
        "max_steps": args.steps, "prompt_groups_per_step": args.groups, "completions_per_prompt": args.group_size,
        "workers.count": args.workers, "synchronous_training": str(synchronous).lower(),
        "inference.max_concurrency": args.groups_per_worker * args.group_size,  # groups in flight per worker
        "max_head_offpolicy_versions": args.offpolicy, "inference.backend": '"openai"',
        "inference.base_url": f'"{server.base_url}/v1"',
        "inference.weight_sync_url": f'"{server.base_url}/update_weights_from_disk"',
        "dcp_save_interval": 0, "save_final_checkpoint": "false",
        "workers.concurrency_control": f'"{args.concurrency_control}"',
    }
    cmd = [python, "-m", "rlstream.cli", "up", str(CONFIG), "--run-id", run_id]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={v}"]
    server.reset_stats()
    env = {**os.environ, "RLSTREAM_REDIS_URL": redis_url, "RLSTREAM_LOG_LEVEL": "WARNING"}
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{run_id} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = read_metrics(workdir / "runs" / run_id / "metrics.jsonl")[1:]  # steps 2..N
    wall = sum(r["perf/step_wall_time"] for r in rows)
    wait = sum(r["perf/trainer_wait_for_sampler_time"] for r in rows)
    stats = server.stats()
    mean_in_flight, at_window = in_flight_figures(stats["in_flight_seconds"],
                                                  args.workers * args.groups_per_worker * args.group_size)
    return {"wall": wall, "idle": wait / wall, "compute": (wall - wait) / len(rows),
            "stale": rows[-1]["async/stale_groups_dropped_total"] if rows else 0,
            "groups": (len(rows) + 1) * args.groups, "mean_in_flight": mean_in_flight, "at_window": at_window,
            "reward": statistics.mean(r["rollout/reward_mean"] for r in rows),
            "overlap": statistics.mean(r.get("perf/overlap_ratio", 0.0) for r in rows),
            "max_in_flight": stats["max_in_flight"]}


def bound(spec: str, groups: int, group_size: int, slots: int, compute: float, trials: int = 2000) -> float:
    """The theoretical speedup (module docstring) by Monte Carlo over ``spec``; ``slots`` = W."""
    draw = parse_latency(spec, seed=12345)
    sync_steps, latencies = [], []
    for _ in range(trials):
        free = [0.0] * slots  # a heap of the times the request slots free
        for _ in range(groups * group_size):  # each request to the slot that frees first
            t = draw()
            latencies.append(t)
            heapq.heapreplace(free, free[0] + t)
        sync_steps.append(max(free))
    sync = compute + statistics.mean(sync_steps)
    asynchronous = max(compute, groups * group_size * statistics.mean(latencies) / slots)
    return sync / asynchronous


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16, help="steps per run (steps 2..N are timed)")
    ap.add_argument("--groups", type=int, default=8, help="prompt groups per step (P)")
    ap.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    ap.add_argument("--workers", type=int, default=12, help="worker processes")
    ap.add_argument("--groups-per-worker", type=int, default=1,
                    help="groups each worker keeps in flight (inference.max_concurrency = this x G); "
                         "K = workers x this")
    ap.add_argument("--offpolicy", type=int, default=2, help="max_head_offpolicy_versions of the async runs (O)")
    ap.add_argument("--tail", default="lognormal:0.25,1.0", help="the long-tail latency (latency_server.py syntax)")
    ap.add_argument("--flat", default=None, help="the tail-free latency (default: fixed at the tail's mean)")
    ap.add_argument("--rounds", type=int, default=1, help="sync/async pairs per latency (order flips each round)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--skip-flat", action="store_true", help="only the long-tail latency")
    ap.add_argument("--concurrency-control", choices=("fixed", "adaptive"), default="fixed",
                    help="the workers' window (workers.concurrency_control)")
    ap.add_argument("--python", action="append", default=None, metavar="LABEL=PATH",
                    help="run `rlstream up` with this interpreter (another checkout's venv), labelled in the table; "
                         "repeat to compare checkouts in one run (default: this interpreter)")
    args = ap.parse_args(argv)
    pythons = [tuple(p.split("=", 1)) for p in args.python] if args.python else [("", sys.executable)]
    if args.flat is None:
        draw = parse_latency(args.tail, seed=99)
        args.flat = f"fixed:{statistics.mean(draw() for _ in range(200_000)):.3f}"
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="rlbench-async-"))
    redis_server = EmbeddedRedis(tmp / "redis")
    results: dict[tuple[str, str, str], list[dict]] = {}
    latencies = [("long tail", args.tail)] + ([] if args.skip_flat else [("no tail", args.flat)])
    t_start = time.monotonic()
    try:
        url = redis_server.start()
        for seed, (name, spec) in enumerate(latencies):
            server = LatencyServer(spec, seed=seed).start()
            for rnd in range(args.rounds):
                order = (True, False) if rnd % 2 == 0 else (False, True)
                for label, python in pythons:
                    for synchronous in order:
                        mode = "sync" if synchronous else "async"
                        run_id = f"{label or 'run'}-{mode}-{name.replace(' ', '')}-{rnd}"
                        result = run_once(tmp, url, server, run_id, args, synchronous, python)
                        results.setdefault((label, name, mode), []).append(result)
                        print(f"  {run_id}: {result}", file=sys.stderr, flush=True)
    finally:
        redis_server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"async vs sync benchmark  {time.strftime('%Y-%m-%d')}  {platform.machine()} {os.cpu_count()} cpus  "
          f"load avg {load:.2f} at start  ({time.monotonic() - t_start:.0f} s)")
    print(f"built-in task, {args.steps} steps (2..{args.steps} timed), P={args.groups} G={args.group_size} "
          f"(B={args.groups * args.group_size}), {args.workers} worker processes x {args.groups_per_worker} group(s) "
          f"in flight, async O={args.offpolicy}, "
          f"{args.rounds} round(s)")
    print()
    print("| checkout | latency | mode | wall s (steps 2..N) | trainer idle share | overlap | compute s/step "
          "| stale drops (of groups) | max requests in flight | mean in flight (share at window) | speedup | bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, _ in pythons:
        for name, spec in latencies:
            s, a = results[(label, name, "sync")], results[(label, name, "async")]
            sync_wall, async_wall = sum(x["wall"] for x in s), sum(x["wall"] for x in a)
            compute = statistics.mean(x["compute"] for x in s)
            limit = bound(spec, args.groups, args.group_size, args.workers * args.groups_per_worker * args.group_size,
                          compute)
            for mode, runs in (("sync", s), ("async", a)):
                wall = sum(x["wall"] for x in runs)
                speed = f"{sync_wall / async_wall:.2f}x" if mode == "async" else ""
                stale, groups = sum(x["stale"] for x in runs), sum(x["groups"] for x in runs)
                print(f"| {label or '-'} | {name} `{spec}` | {mode} | {wall:.1f} "
                      f"| {statistics.mean(x['idle'] for x in runs):.0%} "
                      f"| {statistics.mean(x['overlap'] for x in runs):.2f} "
                      f"| {statistics.mean(x['compute'] for x in runs):.2f} "
                      f"| {stale} ({stale / (groups + stale):.1%}) | {max(x['max_in_flight'] for x in runs)} "
                      f"| {statistics.mean(x['mean_in_flight'] for x in runs):.1f} "
                      f"({statistics.mean(x['at_window'] for x in runs):.0%}) | {speed} "
                      f"| {f'{limit:.2f}x' if mode == 'async' else ''} |")
    print()
    for label, _ in pythons:
        for name, _ in latencies:  # benchmark 4: the share of its wall time the trainer sat idle
            idle = {m: statistics.mean(x["idle"] for x in results[(label, name, m)]) for m in ("sync", "async")}
            print(f"trainer idle share, {label + ', ' if label else ''}{name}: sync {idle['sync']:.0%}, "
                  f"async {idle['async']:.0%} (async/sync {idle['async'] / idle['sync']:.2f})")


if __name__ == "__main__":
    main()
