"""Weight-sync latency: from the trainer publishing version v (its ``WeightsPublished`` event) to
every worker sampling with v, next to the time to write those weights (the trainer's
``perf/weight_write_time``: the directory written and sealed, which the trainer does beside its
next step, docs/design.md §15.79 Weights are written beside the next step; a step reports the
version before its own) and to read them into a live model (``LocalPolicy.load``, timed here).

Run (from the repository root, in the project's venv)::

    python bench/weight_sync.py                       # built-in tiny model, ~1-2 min on 2 cores
    python bench/weight_sync.py --steps 30 --workers 4
    python bench/weight_sync.py --hidden 512 --layers 8   # the built-in task on a ~25M-parameter model

One real ``rlstream up`` of the built-in task (local backend: each worker loads the weights into
its own torch model) on an embedded redis-server this script starts, so the streams outlive the
run. Afterwards, for each version v published and each worker: the first sampling that used v
began at the ``started_at`` stamped on its samples (the worker stamps it after loading the
weights), and v was published at its event's id (the Redis server's clock, the same machine's).
latency(v) = the latest worker's first use - the publish; only versions every worker used count.

The ratios printed: median latency / median (write + read), and / read alone. The latency
starts after the write (the trainer publishes once the directory is complete), so the second is
the one that shows what the path adds to moving the bytes: the event reaching the worker, the
worker finishing the group it was sampling, rq handing it the next job (the producer admits a
group once the gate opens on v).
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlstream.core import bus, keys
from rlstream.core.codec import decode
from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis
from rlstream.core.messages import RolloutRecord, WeightsPublished
from rlstream.core.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "builtin" / "config.toml"


def adoption(r, run_id: str) -> tuple[dict[int, float], dict[int, dict[str, float]]]:
    """(version -> publish time, version -> {worker: first sampling start with >= version})."""
    published = {m.version: int(i.split("-")[0]) / 1000 for i, m in bus.iter_all_events(r, run_id)
                 if isinstance(m, WeightsPublished) and m.version > 0}
    starts: dict[str, list[tuple[int, float]]] = {}
    for _, raw in bus.xrange_all(r, keys.rollouts(run_id)):
        s = decode(raw, expect=RolloutRecord)
        starts.setdefault(s.worker_id, []).append((s.min_version, s.started_at))
    first: dict[int, dict[str, float]] = {}
    for v in published:
        for worker, seen in starts.items():
            later = [t for version, t in seen if version >= v]
            if later:
                first.setdefault(v, {})[worker] = min(later)
    return published, first


def read_time(run_dir: Path, versions: list[int], published: dict[int, WeightsPublished]) -> list[float]:
    """Seconds ``LocalPolicy.load`` takes for each version after the first (a live model updated)."""
    import torch

    from rlstream.sampling.local import LocalPolicy

    policy = LocalPolicy(published[versions[0]], torch.device("cpu"), run_dir / "weights")
    out = []
    for v in versions[1:]:
        t0 = time.perf_counter()
        policy.load(published[v])
        out.append(time.perf_counter() - t0)
    return out


def wider_model(directory: Path, hidden: int, layers: int) -> tuple[Path, int]:
    """The built-in model's architecture and tokenizer, ``hidden`` wide and ``layers`` deep (so the
    built-in task still runs): (its directory, its parameter count)."""
    from transformers import AutoModelForCausalLM

    from rlstream.builtin.tiny_model import build_model, build_tokenizer
    from rlstream.core import weights

    base = build_model().config
    fields = {k: v for k, v in base.to_dict().items() if k != "layer_types"}  # re-derived for the new depth
    fields.update(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers)
    model = AutoModelForCausalLM.from_config(type(base)(**fields))
    weights.write_model_dir(directory, model, build_tokenizer(), version=0)
    return directory, sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=None, help="a wider model than the built-in (e.g. 512)")
    ap.add_argument("--layers", type=int, default=2, help="its depth (with --hidden)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="more config overrides")
    args = ap.parse_args(argv)
    model_note = "built-in model"
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="rlbench-sync-"))
    server = EmbeddedRedis(tmp / "redis")
    run_id = "wsync"
    try:
        url = server.start()
        cmd = [sys.executable, "-m", "rlstream.cli", "up", str(CONFIG), "--run-id", run_id,
               "--set", f"max_steps={args.steps}", "--set", "prompt_groups_per_step=8",
               "--set", "completions_per_prompt=4",
               "--set", f"workers.count={args.workers}", "--set", f"keep_weights={args.steps + 1}",
               "--set", "dcp_save_interval=0", "--set", "save_final_checkpoint=false"]
        if args.hidden:
            path, n_params = wider_model(tmp / "model", args.hidden, args.layers)
            cmd += ["--set", f'base_model="{path}"']
            model_note = f"{n_params / 1e6:.1f}M-parameter model (hidden {args.hidden}, {args.layers} layers)"
        for o in args.overrides:
            cmd += ["--set", o]
        env = {**os.environ, "RLSTREAM_REDIS_URL": url, "RLSTREAM_LOG_LEVEL": "WARNING"}
        proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=900, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        run_dir = tmp / "runs" / run_id
        r = connect(url)
        events = {m.version: m for _, m in bus.iter_all_events(r, run_id) if isinstance(m, WeightsPublished)}
        published, first = adoption(r, run_id)
        r.close()
        workers = {w for by in first.values() for w in by}
        latency = {v: max(first[v].values()) - published[v] for v in published
                   if v in first and set(first[v]) == workers}
        rows = read_metrics(run_dir / "metrics.jsonl")
        # perf/weight_write_time: the previous version's write, 0 when none (before it: weight_sync_time, its own)
        write = ({r["version"] - 1: r["perf/weight_write_time"] for r in rows if r.get("perf/weight_write_time")}
                 or {r["version"]: r["perf/weight_sync_time"] for r in rows})
        reads = read_time(run_dir, sorted(events), events)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    lat = sorted(latency.values())
    w, rd = statistics.median(write[v] for v in latency if v in write), statistics.median(reads)
    print(f"weight-sync benchmark  {time.strftime('%Y-%m-%d')}  {platform.machine()} {os.cpu_count()} cpus  "
          f"load avg {load:.2f} at start")
    print(f"built-in task, {model_note}, local backend, {args.workers} workers, {args.steps} steps, "
          f"{len(latency)} versions used by every worker")
    print()
    print("| what | median s | p90 s |")
    print("|---|---|---|")
    print(f"| write (trainer, `perf/weight_write_time`) | {w:.3f} | {_p90(list(write.values())):.3f} |")
    print(f"| read (`LocalPolicy.load` into a live model) | {rd:.3f} | {_p90(reads):.3f} |")
    print(f"| publish -> every worker sampling with it | {statistics.median(lat):.3f} | {_p90(lat):.3f} |")
    print(f"\nratio sync latency / (write + read): {statistics.median(lat) / (w + rd):.2f}"
          f"   (sync latency / read alone: {statistics.median(lat) / rd:.2f})")


def _p90(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(0.9 * len(values)))]


if __name__ == "__main__":
    main()
