"""What the weight writer's work costs a bare torch step that runs beside it, on a thread of the
trainer's process (as ``trainer/weight_sync.py`` runs it) and in a process of its own
(issue 20: the trainer's step at most 1.3x a bare one; docs/design.md §16 Known gaps).

    python bench/writer_interference.py                 # 30 rounds (~3 min on 2 cores)
    python bench/writer_interference.py --rounds 60

The built-in model and batch of ``bench/trainer_overhead.py``, one torch thread. Each round runs
8 bare steps (advantages, forward, clipped surrogate, backward, AdamW: ``trainer_overhead.bare_step``)
in each of three settings, in alternating order:

- **none**: nothing else runs;
- **thread**: before each step a thread of this process is handed one version's write, the
  trainer's own (``WeightSync.write``: the weights file from a snapshot, the template's files
  as links, fsyncs, sha256, manifest, rename) and the prune of the version past ``keep_weights``;
- **process**: the same work, done by a child process (spawned, its own interpreter) from the
  same snapshot, handed over once.

The table gives each setting's median step and its difference to **none**. The writer's own CPU
time per version (``time.thread_time`` / ``time.process_time`` around its work) says that both
do the same work. Not a test: timings are never asserted (docs/design.md §13 Tests).
"""
from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_overhead as overhead  # noqa: E402  (the batch, the bare step, the config)

KEEP = 2  # keep_weights of the writer's directory: one version pruned per version written
BLOCK = 8  # bare steps per setting and round


class NoLease:
    """The lease check before a write is a Redis round trip on the writer's thread: not what is measured."""

    def confirm(self) -> None:
        pass


def write_versions(template, tensors, run_dir: Path, source: Path, first: int, go, stop, done, cpu, clock) -> None:
    """One version per ``go``: ``WeightSync.write`` into ``run_dir`` and the prune after it, until ``stop``."""
    from rlstream.core import weights
    from rlstream.trainer.policy_model import prune_weights
    from rlstream.trainer.weight_sync import WeightSync

    sync = WeightSync(None, "bench", NoLease(), run_dir, KEEP)
    sync.template, sync.checked, sync.previous = template, True, source
    sync.known = weights.stamps(source, template.files)
    version = first
    while not stop.is_set():
        if not go.wait(0.1):
            continue
        go.clear()
        version += 1
        c0 = clock()
        sync.write(tensors, version)
        prune_weights(run_dir, version, KEEP)
        with cpu.get_lock():
            cpu.value += clock() - c0
            done.value += 1


def child(template, arrays: dict, run_dir: str, source: str, first: int, go, stop, done, cpu) -> None:
    torch.set_num_threads(1)
    tensors = {name: torch.from_numpy(array) for name, array in arrays.items()}
    write_versions(template, tensors, Path(run_dir), Path(source), first, go, stop, done, cpu, time.process_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp, overhead_trainer(Path(tmp)) as t:
        torch.set_num_threads(1)
        batch = overhead.draw_batch(t, t.cfg.seed)
        tensors = t.weight_sync.template.snapshot(t.model)
        assert all(v.dtype == torch.float32 for v in tensors.values()), "the built-in model is float32"
        # each writer its own run directory, holding a copy of the version it links its first one to
        sources = {}
        for name in ("thread", "process"):
            sources[name] = Path(tmp) / name / "weights" / t.weight_sync.previous.name
            shutil.copytree(t.weight_sync.previous, sources[name])
        flat = [m for g in batch for m in g]
        tokens_B_N = torch.tensor([tokens for tokens, _, _ in flat])
        attention_B_N = torch.ones_like(tokens_B_N)
        mask_B_T = torch.zeros(tokens_B_N.shape[0], tokens_B_N.shape[1] - 1)
        mask_B_T[:, -1] = 1.0
        rewards_P_G = torch.tensor([[reward for _, _, reward in g] for g in batch])
        optimizer = overhead.make_optimizer(t.model, t.cfg)

        go_t, stop_t = threading.Event(), threading.Event()
        done_t, cpu_t = spawn.Value("i", 0), spawn.Value("d", 0.0)
        thread = threading.Thread(target=write_versions, daemon=True, args=(
            t.weight_sync.template, tensors, Path(tmp) / "thread", sources["thread"], 1_000, go_t, stop_t, done_t,
            cpu_t, time.thread_time))
        thread.start()
        go_p, stop_p = spawn.Event(), spawn.Event()
        done_p, cpu_p = spawn.Value("i", 0), spawn.Value("d", 0.0)
        process = spawn.Process(target=child, daemon=True, args=(
            t.weight_sync.template, {k: v.numpy() for k, v in tensors.items()}, str(Path(tmp) / "process"),
            str(sources["process"]), 1_000, go_p, stop_p, done_p, cpu_p))
        process.start()
        started = time.monotonic()
        while done_p.value == 0 and time.monotonic() - started < 120:  # the child's imports, then one version
            go_p.set()
            time.sleep(0.5)
        load_start = os.getloadavg()
        steps: dict[str, list[float]] = {"none": [], "thread": [], "process": []}
        counted = {"thread": (0, 0.0), "process": (0, 0.0)}
        for i in range(args.warmup + args.rounds):
            order = list(steps) if i % 2 == 0 else list(steps)[::-1]
            for setting in order:
                go = {"thread": go_t, "process": go_p}.get(setting)
                before = (done_t.value, cpu_t.value) if setting == "thread" else (done_p.value, cpu_p.value)
                times = []
                for _ in range(BLOCK):
                    if go is not None:
                        go.set()
                    t0 = time.perf_counter()
                    overhead.bare_step(t.model, optimizer, tokens_B_N, attention_B_N, mask_B_T, rewards_P_G,
                                       t.cfg.eps_clip, {}, use_cache=False)
                    times.append(time.perf_counter() - t0)
                time.sleep(0.1)  # the block's last version finishes before the next setting
                if i >= args.warmup:
                    steps[setting].append(statistics.median(times))
                    if setting in counted:
                        after = (done_t.value, cpu_t.value) if setting == "thread" else (done_p.value, cpu_p.value)
                        n, c = counted[setting]
                        counted[setting] = (n + after[0] - before[0], c + after[1] - before[1])
        stop_t.set()
        stop_p.set()
        thread.join(10)
        process.join(10)
    base = statistics.median(steps["none"])
    print(f"{datetime.date.today()}  {platform.machine()}  cpus {os.cpu_count()}  load avg "
          f"{' '.join(f'{x:.2f}' for x in load_start)} at start  torch {torch.__version__}  1 torch thread")
    print(f"{args.rounds} rounds of {BLOCK} bare steps per setting (after {args.warmup} warm-up rounds), "
          f"one version written per step\n")
    print("| the writer's work | bare step, median | over none | writer CPU per version |")
    print("|---|---:|---:|---:|")
    for setting, values in steps.items():
        median = statistics.median(values)
        n, c = counted.get(setting, (0, 0.0))
        cpu = f"{1000 * c / n:.2f} ms ({n} versions)" if n else ""
        print(f"| {setting} | {1000 * median:.2f} ms | {1000 * (median - base):+.2f} ms | {cpu} |")


class overhead_trainer:
    """The trainer of ``bench/trainer_overhead.py`` on an embedded redis-server, one step trained
    so that its weight writer has a template and a previous version to link to."""

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def __enter__(self):
        from rlstream.core import bus, keys
        from rlstream.core.config import load_config
        from rlstream.core.connection import client
        from rlstream.core.embedded_redis import EmbeddedRedis
        from rlstream.trainer.trainer import Trainer

        self.server = EmbeddedRedis(self.tmp / "redis")
        url = self.server.start()
        cfg = load_config(overhead.CONFIG, [f'log_path="{self.tmp}/runs"', 'run_id="interference"',
                                            f'redis.url="{url}"', "max_steps=2000"])
        r = client(url)
        self.t = t = Trainer(cfg, r, cfg.run_dir())
        bus.ensure_group(r, keys.rollouts(cfg.run_id))
        t.resume()
        t.perf.restart(t.state, bus.rollout_stats(r, cfg.run_id))
        overhead.prefill(r, cfg.run_id, overhead.stamped(overhead.draw_batch(t, cfg.seed), 0, t.version), t.version)
        groups, _ = t.gather(cfg.prompt_groups_per_step)
        t.train_step(groups, wait_time=0.0)  # v1: written in the background from a snapshot, linked to v0
        t.weight_sync.wait()
        return t

    def __exit__(self, *exc):
        self.t.weight_sync.close()
        self.t.lease.release()
        self.server.stop()


if __name__ == "__main__":
    main()
