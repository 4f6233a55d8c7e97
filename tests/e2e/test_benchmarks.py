"""The benchmarks of bench/ still run end to end (tiny settings; their figures are never
asserted, docs/design.md §13 Tests). Slow: skipped unless `pytest -m slow`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def bench(*args: str, timeout: float) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_async_speedup_prints_both_latencies_with_a_speedup_and_a_bound():
    out = bench("bench/async_speedup.py", "--steps", "3", "--workers", "2", "--groups", "2", timeout=900)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| async |" in line]
    assert len(rows) == 2 and all(line.count("x |") == 2 for line in rows), out
    assert "trainer idle share, long tail: sync" in out


def test_weight_sync_prints_the_ratio():
    out = bench("bench/weight_sync.py", "--steps", "4", timeout=600)
    assert "| publish -> every worker sampling with it |" in out and "ratio sync latency / (write + read):" in out


def test_bus_prints_the_ratio():
    out = bench("bench/bus.py", "--samples", "500", "--repeats", "1", timeout=300)
    assert "ratio rlstream/raw (end-to-end samples/s):" in out


def test_trainer_overhead_prints_every_part_with_its_ratio():
    out = bench("bench/trainer_overhead.py", "--rounds", "2", "--warmup", "1", "--block", "2", "--threads", "1",
                timeout=300)
    assert "| bare torch step | " in out and "| (b) whole step, no waiting: gather + train_step | " in out, out
    assert "| (b) / bare without the KV cache, the median of each round's ratio | " in out, out
    assert "|   write the snapshot (safetensors) (before the links: and the template's files) | " in out, out
    assert "| (b), the mean of every round (a full garbage collection counts where it falls) | " in out, out
    assert "|   the writer thread's CPU per version (time.thread_time) | " in out, out
    assert "| (c) / bare, the median of each round's ratio | " in out, out
    assert "trainer reached step 6;" in out, out


def test_writer_interference_prints_each_setting_with_the_writers_cpu():
    out = bench("bench/writer_interference.py", "--rounds", "2", "--warmup", "1", timeout=300)
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| ") and " ms | " in line]
    assert rows == ["| none", "| thread", "| process"], out
    assert out.count(" versions) |") == 2, out


def test_trainer_memory_prints_each_tree_and_variant():
    # this tree against itself as the baseline: both columns' code paths, tiny sizes
    out = bench("bench/trainer_memory.py", "--rows", "2", "--tokens", "24", "--prompt", "16", "--vocab", "64",
                "--variants", "whole", "8", "--rounds", "1", "--baseline", str(REPO), timeout=600)
    rows = [line.split(" | ")[0] for line in out.splitlines() if line.startswith("| this tree: ") or
            line.startswith("| baseline: ")]
    assert rows == ["| this tree: whole", "| baseline: whole", "| this tree: 8", "| baseline: 8"], out
    assert "(16-token prompts), vocabulary 64" in out, out


def test_worker_cpu_prints_cpu_per_sample_for_every_setting():
    out = bench("bench/worker_cpu.py", "--repeats", "1", "--rounds", "1", "--window", "8", timeout=600)
    rows = [line for line in out.splitlines() if line.startswith("| this | ")]
    assert [row.split(" | ")[1] for row in rows] == ["fixed", "default", "merged"], out
    assert all(float(row.split(" | ")[3]) > 0 for row in rows), out


def test_igpo_vs_grpo_prints_both_advantages():
    out = bench("bench/igpo_vs_grpo.py", "--rounds", "1", "--steps", "12", "--groups", "2", timeout=600)
    assert "| igpo, mean of 1 |" in out and "| grpo, mean of 1 |" in out, out
    assert "igpo (normalization mean, ig_weight 0.5)" in out, out  # the example's settings, stated
