"""rlstream against TRL's GRPOTrainer on rlstream's built-in task, the same settings, one
invocation (issue 20): ``rlstream up examples/builtin/config.toml`` and TRL 1.16.0 given the same
model, prompts, reward and hyperparameters, one after the other (the order alternating by round),
each with its default thread settings.

Run (from the repository root, in the project's venv; TRL runs from its own venv)::

    python bench/vs_trl.py                 # one round, ~3-4 min on 2 cores (+ the TRL venv, once)
    python bench/vs_trl.py --rounds 3      # medians of 3 alternating rounds
    python bench/vs_trl.py --trl-threads default 1             # TRL twice a round: torch's threads, then 1
    python bench/vs_trl.py --python /path/to/venv/bin/python   # a Python with trl installed

TRL is a benchmark dependency only, never a runtime one: it is installed into a side venv this
script builds once and caches (``~/.cache/rlstream-bench/trl-1.16.0/venv``: ``python -m venv``, then
``pip install torch==2.13.0 trl==1.16.0``, torch from local disk; the build fails if pip brings another
torch). The TRL half is bench/trl_grpo_builtin.py, run by that venv's python; it does not import
rlstream: this script writes the built-in model's HF directory (``save_tiny_model``, tokenizer
included) and the config's prompts as JSONL (``builtin_rows(max_rows, seed)``) and passes both in.

Reported per system: wall time from starting the process to its exit for the config's 300 steps,
the time from that start to the first step whose 10-step mean reward reaches 0.8 (and that step),
the final 10-step mean reward, the time to the first step (start-up) and the median time between
steps; then the ratios rlstream / TRL. rlstream's metrics.jsonl has no wall-clock stamp per step, so
this script tails it (and TRL's step log) every 50 ms and stamps each step row when it appears; rlstream
itself is not changed for the bench. Per step rlstream's reward is ``rollout/reward_mean`` (the mean
over the step's 32 x 8 samples), TRL's the ``reward`` it logs (the same mean).

Threads: rlstream's processes set one torch thread each (docs/design.md §15.17 One torch thread per
process); TRL's one process keeps torch's default (one per core). ``--trl-threads default 1`` adds a
TRL run with ``OMP_NUM_THREADS=1`` to each round: on a loaded machine the two differ several-fold.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import rlstream
from rlstream.builtin.task import builtin_rows
from rlstream.builtin.tiny_model import save_tiny_model

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "builtin" / "config.toml"
TRL_SCRIPT = REPO / "bench" / "trl_grpo_builtin.py"
TRL = "trl==1.16.0"
TORCH = "torch==2.13.0"  # the project's torch, on local disk; any other version is a multi-GB download
SIDE_DIR = Path.home() / ".cache" / "rlstream-bench" / TRL.replace("==", "-")
TARGET = 0.8
WINDOW = 10
BUILD_TIMEOUT_S = 1800.0  # building the TRL venv (measured 21 s from local disk; a download may be slow)
RUN_TIMEOUT_S = 1800.0  # one run of 300 steps (measured 40-220 s on a shared 2-core machine)
POLL_S = 0.05


def trl_side_python() -> Path:
    """The cached TRL venv's python, built first when it is missing or half-built (a ``complete``
    marker is written last)."""
    python, marker = SIDE_DIR / "venv" / "bin" / "python", SIDE_DIR / "complete"
    if marker.is_file() and python.is_file():
        return python
    print(f"building the TRL venv in {SIDE_DIR} (once; 20 s to a few minutes)", file=sys.stderr, flush=True)
    shutil.rmtree(SIDE_DIR / "venv", ignore_errors=True)
    SIDE_DIR.mkdir(parents=True, exist_ok=True)
    _check([sys.executable, "-m", "venv", str(SIDE_DIR / "venv")])
    _check([str(python), "-m", "pip", "install", "-q", "--no-compile", TORCH, TRL])
    torch_version = _versions(python)["torch"]
    if torch_version.split("+")[0] != TORCH.split("==")[1]:
        raise SystemExit(f"pip put torch {torch_version} into {SIDE_DIR / 'venv'}, not {TORCH}: delete it and look")
    marker.write_text(_check([str(python), "-m", "pip", "freeze"]).stdout)
    return python


def _check(cmd: list[str], timeout: float = BUILD_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"`{' '.join(cmd)}` did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done


def _versions(python: Path | str) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; print(json.dumps({p: m.version(p) for p in "
            "('torch', 'transformers', 'trl', 'accelerate', 'datasets') if __import__('importlib').util"
            ".find_spec(p)}))")
    return json.loads(_check([str(python), "-c", code]).stdout)


def write_inputs(root: Path, config: dict) -> tuple[Path, Path]:
    """The built-in model's HF directory and the config's prompts as JSONL, for the TRL script."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = save_tiny_model(root / "model", seed=config["seed"])
    prompts = root / "prompts.jsonl"
    with prompts.open("w") as f:
        for row in builtin_rows(config["max_rows"], config["seed"]):
            f.write(json.dumps(row) + "\n")
    return model, prompts


def watch(cmd: list[str], cwd: Path, log: Path, reward_of, env: dict | None = None) -> dict:
    """Start ``cmd``, stamp each step row of ``log`` (seconds since the start) as it appears, and
    wait for the exit: {"wall", "times", "rewards"}."""
    out = (cwd / "output.txt").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    times, rewards, pos, partial = [], [], 0, ""
    while True:
        done = proc.poll() is not None
        now = time.monotonic() - t0
        if log.is_file():
            with log.open() as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            lines = (partial + chunk).split("\n")
            partial = lines.pop()  # a line still being written
            for line in lines:
                reward = reward_of(json.loads(line)) if line.strip() else None
                if reward is not None:
                    times.append(now)
                    rewards.append(reward)
        if done:
            break
        if now > RUN_TIMEOUT_S:  # a hung run must not hang the bench
            proc.kill()
            proc.wait()
            out.close()
            raise SystemExit(f"`{' '.join(cmd)}` still running after {RUN_TIMEOUT_S:.0f} s: killed; its output is in "
                             f"{cwd / 'output.txt'}")
        time.sleep(POLL_S)
    wall = time.monotonic() - t0
    out.close()
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{(cwd / 'output.txt').read_text()[-4000:]}")
    return {"wall": wall, "times": times, "rewards": rewards}


def run_rlstream(root: Path, tag: str) -> dict:
    cwd = root / f"rlstream-{tag}"
    cwd.mkdir()
    cmd = [sys.executable, "-m", "rlstream.cli", "up", str(CONFIG), "--run-id", tag]
    return watch(cmd, cwd, cwd / "runs" / tag / "metrics.jsonl",
                 lambda row: None if "eval/version" in row else row.get("rollout/reward_mean"))


def run_trl(root: Path, tag: str, python: Path, model: Path, prompts: Path, config: dict,
            threads: str = "default") -> dict:
    cwd = root / f"trl-{threads}-{tag}"
    cwd.mkdir()
    cmd = [str(python), str(TRL_SCRIPT), "--model", str(model), "--prompts", str(prompts), "--log", "steps.jsonl",
           "--steps", str(config["max_steps"]), "--groups", str(config["prompt_groups_per_step"]),
           "--completions", str(config["completions_per_prompt"]), "--lr", str(config["learning_rate"]),
           "--seed", str(config["seed"])]
    # Nothing is downloaded; datasets' cache of the JSONL lives in the round's directory, so every
    # round pays the same for it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(cwd / "hf")}
    if threads != "default":
        env["OMP_NUM_THREADS"] = threads
    return watch(cmd, cwd, cwd / "steps.jsonl", lambda row: row.get("reward"), env=env)


def summarize(r: dict) -> dict:
    """Wall, time and step at which the 10-step mean reward first reaches 0.8, final 10-step
    mean, start-up (time to the first step row) and the median time between step rows."""
    rewards, times = r["rewards"], r["times"]
    reach = next((i for i in range(WINDOW - 1, len(rewards))
                  if sum(rewards[i - WINDOW + 1:i + 1]) / WINDOW >= TARGET), None)
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"wall": r["wall"], "steps": len(rewards),
            "t_reach": None if reach is None else times[reach], "step_reach": None if reach is None else reach + 1,
            "final": sum(rewards[-WINDOW:]) / min(WINDOW, len(rewards)) if rewards else float("nan"),
            "first_step": times[0] if times else float("nan"),
            "step_s": statistics.median(gaps) if gaps else float("nan")}


def median_of(rounds: list[dict], key: str) -> float | None:
    values = [r[key] for r in rounds if r[key] is not None]
    return statistics.median(values) if values else None


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=1, help="alternating rounds (medians reported)")
    ap.add_argument("--python", type=Path, help="a Python with trl installed (default: the cached side venv)")
    ap.add_argument("--trl-threads", nargs="+", default=["default"], metavar="N",
                    help="TRL runs per round: 'default' (torch's own thread count) and/or OMP_NUM_THREADS values, "
                    "e.g. --trl-threads default 1")
    args = ap.parse_args(argv)
    config = tomllib.loads(CONFIG.read_text())
    python = args.python or trl_side_python()
    side = _versions(python)
    here = _versions(sys.executable)
    load = os.getloadavg()
    print(f"rlstream vs TRL benchmark  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()} {os.cpu_count()} cpus  "
          f"load avg {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start", flush=True)
    print(f"rlstream {rlstream.__version__} (Python {platform.python_version()}, torch {here['torch']}, "
          f"transformers {here['transformers']}); TRL {side.get('trl')} (torch {side.get('torch')}, transformers "
          f"{side.get('transformers')}, accelerate {side.get('accelerate')})", flush=True)
    threads = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    print(f"built-in task per {CONFIG.relative_to(REPO)}: {config['max_steps']} steps x "
          f"{config['prompt_groups_per_step']} prompts x {config['completions_per_prompt']} completions, "
          f"lr {config['learning_rate']:g} {config['lr_schedule']}, beta {config['kl_beta']:g}, "
          f"{config['workers']['count']} rlstream workers, O = {config['max_head_offpolicy_versions']}; "
          f"default threads{' ' + str(threads) if threads else ''}; {args.rounds} round(s)", flush=True)
    trl_runs = {("TRL" if t == "default" else f"TRL, OMP_NUM_THREADS={t}"): t for t in args.trl_threads}
    results: dict[str, list[dict]] = {"rlstream": [], **{name: [] for name in trl_runs}}
    root = Path(tempfile.mkdtemp(prefix="rlbench-vs-trl-"))
    try:
        model, prompts = write_inputs(root, config)
        for i in range(args.rounds):
            order = list(results) if i % 2 == 0 else list(results)[::-1]
            for system in order:
                load1 = os.getloadavg()[0]
                r = (run_rlstream(root, f"r{i}") if system == "rlstream"
                     else run_trl(root, f"r{i}", python, model, prompts, config, trl_runs[system]))
                s = summarize(r)
                results[system].append(s)
                print(f"  round {i + 1} {system}: wall {s['wall']:.1f} s, reward {TARGET} at "
                      f"{fmt(s['t_reach'])} s (step {s['step_reach']}), final {s['final']:.3f}, "
                      f"{s['steps']} steps, load avg {load1:.2f} at its start", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nload avg {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end\n")
    head = "median of rounds: " if args.rounds > 1 else ""
    print(f"| system | {head}wall s (start to exit) | time to reward {TARGET} s | step reaching {TARGET} "
          f"| final 10-step reward | first step at s | s per step (median) |")
    print("|---|---|---|---|---|---|---|")
    med = {}
    for system, rounds in results.items():
        med[system] = {k: median_of(rounds, k) for k in ("wall", "t_reach", "step_reach", "final", "first_step",
                                                         "step_s")}
        m = med[system]
        print(f"| {system} | {fmt(m['wall'])} | {fmt(m['t_reach'])} | {fmt(m['step_reach'], '.0f')} "
              f"| {fmt(m['final'], '.3f')} | {fmt(m['first_step'])} | {fmt(m['step_s'], '.3f')} |")
    print()
    a = med["rlstream"]
    for name in trl_runs:
        b = med[name]
        ratio = {k: (a[k] / b[k] if a[k] is not None and b[k] else None) for k in ("wall", "t_reach", "step_s")}
        print(f"rlstream / {name}: wall {fmt(ratio['wall'], '.2f')}, time to reward {TARGET} "
              f"{fmt(ratio['t_reach'], '.2f')}, s per step {fmt(ratio['step_s'], '.2f')}")


if __name__ == "__main__":
    main()
