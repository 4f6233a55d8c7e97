"""The numeric-equivalence tests (marker ``numeric``) once more under every other vector ISA this
machine supports (docs/design.md §13 Tests): torch picks its CPU kernels by ISA (AVX-512, AVX2, or
the default), each rounds differently, and a tolerance that holds on one has failed on another. So
a machine of one kind checks what the others would see: each ``ATEN_CPU_CAPABILITY`` value runs
``pytest -m numeric`` in a subprocess.

A value above what the CPU supports is skipped, saying so: torch 2.13 does not check it against the
CPU (asked for avx512 on an AVX2-only AMD EPYC, it ran AVX-512 kernels and died of SIGILL), so
the CPU's best, what torch picks with the variable unset, is the ceiling. The ISA this process
runs with is the suite's own run. This test is not
marked ``numeric`` (the subprocess does not collect it), and ``RERUN`` guards it as well."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# Every unit test marked `numeric`, wherever it is: a list of files would miss a new one.
NUMERIC_TESTS = "tests/unit"
CAPABILITIES = ["default", "avx2", "avx512"]  # x86-64's ATEN_CPU_CAPABILITY values
RERUN = "RLSTREAM_ISA_RERUN"  # set in the subprocess
# seconds per ISA: about 90 s on an idle 2-core machine plus ~35 s for test_trainer_ranks.py's two-rank
# process group, several times that under a loaded suite
TIMEOUT = 600.0


def resolved(value: str | None) -> str:
    """The capability torch runs with when ``ATEN_CPU_CAPABILITY`` is ``value`` (None: unset, the
    CPU's best), lower case."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if value is not None:
        env["ATEN_CPU_CAPABILITY"] = value
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().lower()


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_the_numeric_tests_pass_under_every_cpu_capability_the_machine_supports(capability, tmp_path):
    if os.environ.get(RERUN):
        pytest.skip("already inside an ISA rerun")
    current = torch.backends.cpu.get_cpu_capability().lower()
    if capability == current:
        pytest.skip(f"{capability}: the ISA this run uses; the suite's own run covers it")
    best = resolved(None)
    if best in CAPABILITIES and CAPABILITIES.index(capability) > CAPABILITIES.index(best):
        pytest.skip(f"{capability}: not supported by this CPU (its best is {best})")
    actual = resolved(capability)
    if actual != capability:
        pytest.skip(f"{capability}: not supported by this CPU (torch falls back to {actual}, covered by its own case)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, RERUN: "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("PYTEST_ADDOPTS", None)
    # --basetemp: a pytest session prunes all but the newest three /tmp/pytest-of-<user>/pytest-N,
    # which would delete the running suite's own (its redis-server's socket and AOF among them:
    # a worker under test then lost Redis and hung).
    command = [sys.executable, "-m", "pytest", "-m", "numeric", "-n", "0", "-p", "no:cacheprovider", "-q",
               "--basetemp", str(tmp_path / "rerun"), NUMERIC_TESTS]
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as timeout:
        out = timeout.stdout.decode(errors="replace") if isinstance(timeout.stdout, bytes) else timeout.stdout or ""
        pytest.fail(f"ATEN_CPU_CAPABILITY={capability}: the numeric tests took over {TIMEOUT:.0f} s\n{out[-4000:]}")
    assert proc.returncode == 0, (f"ATEN_CPU_CAPABILITY={capability}: {' '.join(command)} failed\n"
                                  f"{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")
    assert " passed" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]  # it ran tests, not none
