"""One request per group against a real vLLM server: rlstream's own sampler
(``rlstream.sampling.remote.RemoteSampler``) drawing groups of the built-in task with
``inference.merge_requests`` on (a group's G single-sample draws go out as one request with n =
G) and off (G requests of n = 1), in alternating rounds against one server, and their ratio.

Run (from the repository root, in the project's venv; vLLM runs from its own venv)::

    python bench/merged_requests.py                 # 6 rounds of 64 groups x 8, ~3 min on 2 cores
    python bench/merged_requests.py --rounds 4 --groups 32 --completions 16

``--python`` is a Python with vLLM (default: the test suite's cached side venv, as in
bench/engine_sync.py). The server serves ``builtin:tiny-h64`` (``--dtype float32
--enforce-eager``, ``VLLM_CPU_KVCACHE_SPACE=1``). Each round draws ``--groups`` groups of the
task's "a+b=" prompts, every group's ``--completions`` draws started together as a worker's
rollout_fn tasks start, at most ``--window`` draws in flight (a worker's request window); one
token each, temperature 1. Printed per setting: samples/s of each round and their median, and
the median ratio merged / one by one (rounds paired in run order).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from engine_sync import SIDE_PYTHON, free_port, require_vllm_python, start_vllm, stop, wait_healthy

from rlstream.builtin.task import VOCAB
from rlstream.builtin.tiny_model import save_tiny_model
from rlstream.core.config import InferenceConfig
from rlstream.core.messages import WeightsPublished
from rlstream.sampling.remote import RemotePolicy, RemoteSampler

IDS = {tok: i for i, tok in enumerate(VOCAB)}


def prompt(k: int) -> list[int]:
    a, b = divmod(k % 100, 10)
    return [IDS[str(a)], IDS["+"], IDS[str(b)], IDS["="]]


async def draw_round(url: str, merge: bool, groups: int, completions: int, window: int) -> float:
    """Samples/s of one round: ``groups`` groups, each group's draws started in one loop pass,
    at most ``window`` draws in flight (groups admitted whole, as a worker's slots admit them)."""
    cfg = InferenceConfig(backend="openai", base_url=f"{url}/v1", merge_requests=merge, max_concurrency=window)
    policy = RemotePolicy(cfg, WeightsPublished(version=0, uri="v0", sha256="0" * 64, bytes=1), None, "bench",
                          Path("."))
    sampler = RemoteSampler(policy, {"max_tokens": 1, "temperature": 1.0})
    room = asyncio.Semaphore(max(1, window // completions))

    async def group(k: int) -> int:
        async with room:
            out = await asyncio.gather(*[sampler.sample_with_prompt_tokens(prompt(k)) for _ in range(completions)])
        return sum(len(c) for c in out)

    t0 = time.perf_counter()
    drawn = sum(await asyncio.gather(*[group(k) for k in range(groups)]))
    policy.close()
    return drawn / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--python", type=Path, default=SIDE_PYTHON, help="a Python with vLLM installed")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--completions", type=int, default=8)
    ap.add_argument("--window", type=int, default=64, help="draws in flight (inference.max_concurrency)")
    args = ap.parse_args(argv)
    require_vllm_python(args.python)
    load = os.getloadavg()[0]
    root = Path(tempfile.mkdtemp(prefix="rlbench-merge-"))
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", root / "vllm.log"
    proc = start_vllm(args.python, save_tiny_model(root / "model", name="builtin:tiny-h64"), port, log)
    rates: dict[bool, list[float]] = {True: [], False: []}
    try:
        with httpx.Client() as client:
            startup = wait_healthy(client, url, proc, log)
        asyncio.run(draw_round(url, True, args.groups // 4, args.completions, args.window))  # warm-up, not timed
        for i in range(args.rounds):
            for merge in (True, False) if i % 2 == 0 else (False, True):
                rates[merge].append(asyncio.run(draw_round(url, merge, args.groups, args.completions, args.window)))
                print(f"round {i + 1} merge_requests={merge}: {rates[merge][-1]:.0f} samples/s", flush=True)
    finally:
        stop(proc)
        shutil.rmtree(root, ignore_errors=True)
    ratios = [m / s for m, s in zip(rates[True], rates[False])]
    print(f"\nmerged requests benchmark  {time.strftime('%Y-%m-%d')}  {platform.machine()} {os.cpu_count()} cpus  "
          f"load avg {load:.2f} at start  vLLM start {startup:.0f} s  {args.rounds} rounds of {args.groups} groups "
          f"x {args.completions}, {args.window} draws in flight\n")
    print("| inference.merge_requests | requests per group | samples/s per round | median |")
    print("|---|---|---|---|")
    for merge in (True, False):
        print(f"| {str(merge).lower()} | {1 if merge else args.completions} "
              f"| {', '.join(f'{r:.0f}' for r in rates[merge])} | {statistics.median(rates[merge]):.0f} |")
    print(f"\nratio merged / one by one: median {statistics.median(ratios):.2f} "
          f"(per round {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
