"""Worker CPU per sample against a remote inference server, two checkouts side by side: real
``rlstream worker`` processes of each checkout (each run by its own venv's interpreter) against
the in-process stand-in server of ``bench/standin_server.py`` in the setting of
``bench/throughput.py``'s first table (openai backend, latency-bound server, the built-in task,
one-token completions, G = 4, ``inference.max_concurrency`` 32), in alternating rounds.

Run (from the repository root, in the project's venv)::

    python bench/worker_cpu.py                                     # this checkout only, ~3 min
    # the old commit next to this one (a git worktree with its own venv), ~8 min on 2 cores
    git worktree add --detach /tmp/old bfa5696 && (cd /tmp/old && python3 -m venv .venv && \\
        .venv/bin/pip install -q -e '.[test]')
    python bench/worker_cpu.py --python old=/tmp/old/.venv/bin/python --python new=.venv/bin/python

What runs: one embedded redis-server and the stand-in server (``--latency``, every request
costs that and nothing else) for the whole invocation. Each measurement is one driver process
run by the checkout's interpreter (this file with ``--drive``; it imports that checkout's
rlstream): it publishes v0, starts ``--workers`` worker processes, waits until rq sees them,
admits two warm-up groups per worker (a worker's first job loads its tokenizer and opens its
connections) and waits for their samples, reads each worker's CPU time (utime + stime of
``/proc/<pid>/stat``), admits ``--rounds`` full windows of groups, waits for the last sample in
the rollouts stream, reads the CPU time again and stops the workers. So start-up and warm-up
are left out; what is counted is everything a worker process does while the timed samples go
through (its threads, rq's bookkeeping, heartbeats, the HTTP client, the checks, the encode,
the MULTI). The admission itself runs in the driver, which is not counted.

Settings (``--settings``), each run for every checkout:
- ``fixed``: ``workers.concurrency_control = "fixed"`` (the throughput table's: the window full
  from the first request), every other setting at the checkout's default;
- ``default``: the checkout's default ``workers.concurrency_control`` (before issue 20:
  "fixed"; since: "adaptive", which starts at 16 requests and grows);
- ``merged``: ``fixed`` with ``inference.merge_requests = true`` (a group's G draws as one
  request of n = G), for checkouts that have the setting (skipped for the others).

Printed: per checkout and setting, the median over rounds of worker CPU ms per sample and
samples/s (timed window, admission of the first group to the last sample), requests per sample
(the stand-in's count), and the ratio of each checkout's CPU ms per sample to the first
``--python``'s (the baseline), per setting.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("fixed", "default", "merged")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_requests(base: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{base}/stats", timeout=10) as answer:
        return int(json.loads(answer.read())["requests"])


def drive(spec: dict) -> dict:
    """One measurement with this interpreter's rlstream (the checkout under test): see the module
    docstring. Only APIs every checkout since issue 18 has are used here."""
    from rlstream.builtin.task import builtin_rows
    from rlstream.builtin.tiny_model import save_tiny_model
    from rlstream.core import bus, keys
    from rlstream.core.config import Config, InferenceConfig
    from rlstream.core.connection import connect
    from rlstream.core.credentials import PASSWORD_ENV
    from rlstream.core.jobs import job_queue
    from rlstream.core.messages import WeightsPublished
    from rlstream.producers.producer import admit

    root, setting, group, window = Path(spec["root"]), spec["setting"], spec["group"], spec["window"]
    if setting == "merged" and "merge_requests" not in InferenceConfig.model_fields:
        return {"skipped": "no inference.merge_requests in this checkout"}
    model = root / f"tiny-{spec['label']}"
    if not model.exists():
        save_tiny_model(model)
    inference = {"backend": "openai", "base_url": f"{spec['base']}/v1", "max_concurrency": window, "timeout": 600}
    if setting == "merged":
        inference["merge_requests"] = True
    cfg = Config(run_id=spec["run_id"], log_path=str(root / "runs"), base_model=str(model),
                 tokenizer_model=str(model), completions_per_prompt=group, max_completion_tokens=1, max_seq_len=16,
                 job_timeout=600, redis={"url": spec["redis_url"]}, device="cpu", inference=inference,
                 workers={} if setting == "default" else {"concurrency_control": "fixed"})
    r = connect(spec["redis_url"])
    bus.xadd(r, keys.events(cfg.run_id), WeightsPublished(version=0, uri="v0", sha256="0" * 64, bytes=1))
    config = root / f"{cfg.run_id}.json"
    config.write_text(json.dumps(cfg.model_dump(mode="json")))
    queue = job_queue(r, cfg)
    env = {**os.environ, PASSWORD_ENV: spec["redis_password"], "RLSTREAM_LOG_LEVEL": "WARNING"}
    procs = []
    for i in range(spec["workers"]):
        log = (root / f"{cfg.run_id}-{i}.log").open("wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "rlstream.cli", "worker", str(config)], cwd=root,
                                      stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))
    try:
        from rq import Worker

        deadline = time.monotonic() + 300
        while Worker.count(queue=queue) < len(procs):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"workers did not start; see {root}/{cfg.run_id}-*.log")
            time.sleep(0.1)
        stream = keys.rollouts(cfg.run_id)
        for i, row in enumerate(builtin_rows(2 * len(procs), seed=1)):  # warm-up: not counted
            admit(r, queue, cfg, 1, i, row, 0)
        warm = 2 * len(procs) * group
        while r.xlen(stream) < warm:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the warm-up groups were not sampled; see {root}/{cfg.run_id}-*.log")
            time.sleep(0.05)
        groups = spec["rounds"] * len(procs) * max(1, window // group)
        rows = list(builtin_rows(groups, seed=0))
        time.sleep(0.5)  # the warm-up jobs' bookkeeping (rq's success handling) ends before the first reading
        requests_before = server_requests(spec["base"])
        cpu_before = [cpu_seconds(p.pid) for p in procs]
        started = time.perf_counter()
        for i, row in enumerate(rows):
            admit(r, queue, cfg, 0, i, row, 0)
        while r.xlen(stream) < warm + groups * group:
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"{r.xlen(stream) - warm} of {groups * group} samples after 600 s")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(p.pid) - before for p, before in zip(procs, cpu_before))
        requests = server_requests(spec["base"]) - requests_before
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    samples = groups * group
    return {"samples": samples, "elapsed": elapsed, "cpu": cpu, "requests": requests,
            "control": cfg.workers.concurrency_control}


def measure(python: str, label: str, setting: str, run_id: str, args, world: dict) -> dict:
    spec = {**world, "label": label, "setting": setting, "run_id": run_id, "group": args.group,
            "window": args.window, "workers": args.workers, "rounds": args.rounds}
    proc = subprocess.run([python, str(Path(__file__).resolve()), "--drive", json.dumps(spec)], cwd=REPO,
                          capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} {setting} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", action="append", default=None, metavar="LABEL=PATH",
                    help="a checkout's venv interpreter, labelled in the table; repeat to compare checkouts in one "
                         "run (the first is the baseline of the ratios; default: this interpreter)")
    ap.add_argument("--settings", nargs="*", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--latency", default="const:0.5", help="the stand-in server's latency")
    ap.add_argument("--group", type=int, default=4, help="completions_per_prompt (G)")
    ap.add_argument("--window", type=int, default=32, help="inference.max_concurrency")
    ap.add_argument("--workers", type=int, default=1, help="worker processes per measurement")
    ap.add_argument("--rounds", type=int, default=10, help="full windows of groups per measurement (timed)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of every checkout x setting (order alternates)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per measurement")
    ap.add_argument("--drive", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.drive is not None:
        print(json.dumps(drive(json.loads(args.drive))), flush=True)
        return

    sys.path.insert(0, str(REPO / "bench"))
    from standin_server import StandinServer

    from rlstream.core.embedded_redis import EmbeddedRedis

    pythons = [tuple(p.split("=", 1)) for p in args.python] if args.python else [("this", sys.executable)]
    print(f"rlstream worker CPU per sample  {datetime.datetime.now():%Y-%m-%d %H:%M}  {platform.machine()} "
          f"{os.cpu_count()} cpus  load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start", flush=True)
    print(f"python {platform.python_version()}  stand-in latency {args.latency}  G {args.group}  max_concurrency "
          f"{args.window}  {args.workers} worker(s)  {args.rounds} windows ({args.rounds * args.window} samples per "
          f"worker) per measurement  {args.repeats} repeats", flush=True)
    for label, python in pythons:
        checkout = str(Path(python).absolute().parents[2])  # <checkout>/.venv/bin/python
        head = subprocess.run(["git", "-C", checkout, "log", "-1", "--format=%h %s"], capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", checkout, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        print(f"  {label}: {python} ({head[:80] or 'not a git checkout'}{' + uncommitted changes' if dirty else ''})",
              flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[tuple[str, str], list[dict]] = {}
    server = StandinServer(args.latency, vocab_size=16)
    base = server.start()
    with tempfile.TemporaryDirectory(prefix="rlstream-bench-cpu-") as tmp:
        root = Path(tmp)
        redis_server = EmbeddedRedis(root / "redis")
        redis_server.start()
        world = {"root": str(root), "base": base, "redis_url": redis_server.url,
                 "redis_password": redis_server.password}
        try:
            for repeat in range(args.repeats):
                order = pythons if repeat % 2 == 0 else pythons[::-1]
                for setting in args.settings:
                    for label, python in order:
                        res = measure(python, label, setting, f"cpu-{label}-{setting}-{repeat}", args, world)
                        if "skipped" in res:
                            continue
                        results.setdefault((label, setting), []).append(res)
                        print(f"  {repeat + 1}/{args.repeats} {label:>6} {setting:>8} ({res['control']}): "
                              f"{res['samples']} samples in {res['elapsed']:.2f}s, worker CPU {res['cpu']:.2f}s = "
                              f"{1000 * res['cpu'] / res['samples']:.2f} ms/sample", flush=True)
        finally:
            redis_server.stop()
            server.stop()
    print_table(results, pythons, args.settings)


def print_table(results: dict[tuple[str, str], list[dict]], pythons: list[tuple[str, str]],
                settings: list[str]) -> None:
    baseline = pythons[0][0]
    print()
    print(f"| checkout | setting | workers.concurrency_control | worker CPU ms/sample | samples/s "
          f"| requests/sample | CPU vs {baseline} |")
    print("|---|---|---|---|---|---|---|")
    for setting in settings:
        base_runs, against = results.get((baseline, setting)), ""
        if not base_runs:  # a setting the baseline does not have (merged): against its fixed window
            base_runs, against = results.get((baseline, "fixed")), f" (vs {baseline} fixed)"
        base_ms = statistics.median(1000 * x["cpu"] / x["samples"] for x in base_runs) if base_runs else None
        for label, _ in pythons:
            runs = results.get((label, setting))
            if not runs:
                continue
            ms = statistics.median(1000 * x["cpu"] / x["samples"] for x in runs)
            rate = statistics.median(x["samples"] / x["elapsed"] for x in runs)
            per = statistics.median(x["requests"] / x["samples"] for x in runs)
            ratio = f"{ms / base_ms:.2f}{against if label != baseline else ''}" if base_ms else "-"
            print(f"| {label} | {setting} | {runs[0]['control']} | {ms:.2f} | {rate:.0f} | {per:.2f} | {ratio} |")


if __name__ == "__main__":
    main()
