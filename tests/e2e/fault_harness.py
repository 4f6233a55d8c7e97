"""Harness for the fault-injection end-to-end tests (tests/e2e/test_faults.py): an
``rlstream up`` subprocess that can find and kill its own children, polling helpers, ledger
assertions, and a generator of malformed rollouts-stream entries.

Processes are found by their command line, which names the run's config path
(``python -m rlstream.cli <role> runs/<id>/config.json``), and additionally by their working
directory (the test's ``tmp_path``), so processes of other runs on the machine, even ones
with the same run id, are never touched.
"""
from __future__ import annotations

import math
import os
import random
import re
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import msgpack
from factories import rlstream  # noqa: F401  (re-exported: the harness's tests run the CLI with it)
from polling import wait_until

from rlstream.core import keys
from rlstream.core.codec import decode
from rlstream.core.messages import RolloutRecord
from rlstream.core.metrics import read_metrics

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "builtin" / "config.toml"
VOCAB_SIZE = 16  # the built-in tiny model
MAX_SEQ_LEN = 16  # examples/builtin/config.toml


# --------------------------------------------------------------------------- helpers


class Up:
    """One ``rlstream up`` subprocess (stdout/stderr to files under ``cwd``)."""

    def __init__(self, cwd: Path, run_id: str, *args: str, env: dict[str, str] | None = None, tag: str = "up"):
        self.cwd, self.run_id = cwd, run_id
        self.run_dir = cwd / "runs" / run_id
        self.stdout_path, self.stderr_path = cwd / f"{tag}.stdout", cwd / f"{tag}.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "rlstream.cli", "up", str(CONFIG), "--run-id", run_id,
                                          *args], cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **(env or {})})

    @property
    def config_path(self) -> str:
        return f"runs/{self.run_id}/config.json"

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def logs(self) -> str:
        """Everything useful for a failure message: up's output and each child log's tail."""
        parts = [f"--- up stdout (tail)\n{self.stdout()[-2000:]}", f"--- up stderr (tail)\n{self.stderr()[-4000:]}"]
        for path in sorted((self.run_dir / "logs").glob("*.log")):
            parts.append(f"--- {path.name} (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def steps(self) -> int:
        """Progress: lines in metrics.jsonl (the trainer rewrites it on resume; that is fine
        for ">= n" predicates)."""
        path = self.run_dir / "metrics.jsonl"
        return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0

    def wait_steps(self, n: int, timeout: float) -> None:
        def reached() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"rlstream up exited with {self.proc.returncode} before step {n}\n{self.logs()}")
            return self.steps() >= n

        try:
            wait_until(reached, timeout, f"step >= {n} of run {self.run_id}", interval=0.2)
        except AssertionError as exc:
            if "timed out" in str(exc):
                raise AssertionError(f"{exc}\n{self.logs()}") from None
            raise

    def wait_exit(self, timeout: float) -> int:
        try:
            wait_until(lambda: self.proc.poll() is not None, timeout, f"rlstream up ({self.run_id}) to exit",
                       interval=0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None
        return self.proc.returncode

    def child_pids(self, role: str) -> list[int]:
        """Pids of this run's ``role`` children: command line names the run's config path
        and the process runs in this test's directory."""
        pattern = f"rlstream\\.cli {role} {re.escape(self.config_path)}"
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        pids = []
        for pid in map(int, found):
            try:
                if Path(os.readlink(f"/proc/{pid}/cwd")) == self.cwd:
                    pids.append(pid)
            except OSError:  # exited meanwhile
                pass
        return sorted(pids)

    def redis_pid(self) -> int | None:
        """The run's embedded redis-server (its pid file), checked against /proc."""
        pid_file = self.run_dir / "redis" / "pid"
        if not pid_file.is_file():
            return None
        pid = int(pid_file.read_text())
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))  # redis-server chdirs to its --dir
        except OSError:
            return None
        # Not the command line's socket path: a long run directory (pytest-xdist's) puts the socket in /tmp.
        return pid if "redis-server" in cmdline and cwd == (self.run_dir / "redis").resolve() else None

    def stop(self) -> None:
        """Cleanup after a failed test: Ctrl-C ``up`` (it stops its children), then SIGKILL
        whatever of this run is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for role in ("trainer", "producer", "worker"):
            for pid in self.child_pids(role):
                _kill(pid)
        pid = self.redis_pid()
        if pid is not None:
            _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def running_up(cwd: Path, run_id: str, *args: str, env: dict[str, str] | None = None, tag: str = "up") -> Iterator[Up]:
    up = Up(cwd, run_id, *args, env=env, tag=tag)
    try:
        yield up
    finally:
        up.stop()


def busy_worker(r, run_id: str, pids: list[int], timeout: float = 5.0) -> tuple[int, str | None]:
    """(pid, rq job id) of a worker among ``pids`` that rq reports busy; (pids[0], None)
    when none is within ``timeout``."""
    from rq import Queue, Worker

    queue = Queue(keys.job_queue_name(run_id), connection=r)

    def find() -> tuple[int, str | None] | None:
        for w in Worker.all(queue=queue):
            if w.pid in pids and w.get_state() == "busy" and w.get_current_job_id():
                return w.pid, w.get_current_job_id()
        return None

    try:
        return wait_until(find, timeout, "a busy worker", interval=0.01)
    except AssertionError:
        return pids[0], None


def sigkill(pid: int) -> None:
    """SIGKILL and wait until the pid is gone (or a zombie of its parent)."""
    os.kill(pid, signal.SIGKILL)

    def gone() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
        except OSError:
            return True

    wait_until(gone, 10, f"pid {pid} to die", interval=0.2)


def assert_summary(up: Up, steps: int) -> None:
    lines = up.stdout().strip().splitlines()
    assert lines, up.logs()
    assert lines[-1].startswith(f"summary: steps={steps} final_version={steps}"), lines[-1] + "\n" + up.logs()


def assert_audit_clean(run_dir: Path, cwd: Path, context: str = "", env: dict[str, str] | None = None) -> str:
    """``env``: e.g. RLSTREAM_REDIS_PASSWORD for a run on an external Redis (config.json
    holds its URL without the password; an embedded server's password file is found)."""
    audit = rlstream("audit", str(run_dir.relative_to(cwd)), cwd=cwd, env=env)
    assert audit.returncode == 0, context + audit.stdout + audit.stderr
    assert "groups_lost: 0" in audit.stdout.splitlines(), audit.stdout
    assert "trained_twice: 0" in audit.stdout.splitlines(), audit.stdout
    return audit.stdout


def assert_steps_exactly(run_dir: Path, n: int) -> None:
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, n + 1)), [r["step"] for r in rows]
    assert [r["version"] for r in rows] == list(range(1, n + 1)), [r["version"] for r in rows]


# --------------------------------------------------------------------------- malformed entries


def _packed(typecode: str, values: list) -> bytes:
    """Little-endian packed array, as the codec sends per-token fields (i/f/B = int32/float32/uint8)."""
    return struct.pack(f"<{len(values)}{typecode}", *values)


def malformed_entries(real_raw: bytes, rng: random.Random) -> list[tuple[bytes, bytes, str]]:
    """(field, value, what) triples: ~300 rollouts-stream entries no consumer may accept.
    ``real_raw`` is the encoded bytes of a real worker-written ``RolloutRecord``."""
    real = decode(real_raw, expect=RolloutRecord)
    base = msgpack.unpackb(real_raw, raw=False)  # the envelope as a plain map (arrays packed)
    n = len(real.tokens)
    out: list[tuple[bytes, bytes, str]] = []

    for _ in range(120):
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        out.append((b"m", blob, "random bytes"))
    for _ in range(60):
        out.append((b"m", real_raw[:rng.randrange(1, len(real_raw))], "truncated msgpack"))

    def envelope(i: int, **changes) -> bytes:
        data = dict(base)
        # fresh ids in half the cases, the real sample's ids (a corrupted duplicate) in the other half
        if i % 2:
            data.update(sample_id=f"fuzz-s{i}-{rng.randrange(10**9)}", group_id=f"fuzz-g{i}")
        data.update(changes)
        return msgpack.packb(data, use_bin_type=True)

    mask = [0] * (n - 1) + [1]
    variants: list[tuple[str, Callable[[int], bytes]]] = [
        ("unequal lengths", lambda i: envelope(i, logprobs=_packed("f", [0.0] * (n + 1 + i % 3)))),
        ("NaN logprob", lambda i: envelope(i, logprobs=_packed("f", [0.0] * (n - 1) + [math.nan]))),
        ("inf reward", lambda i: envelope(i, reward=math.inf)),
        ("token id outside the vocabulary", lambda i: envelope(i, tokens=_packed("i", [1] * (n - 1) + [10**6 + i]))),
        ("negative token id", lambda i: envelope(i, tokens=_packed("i", [-1 - i] + [1] * (n - 1)))),
        ("schema_version 99", lambda i: envelope(i, schema_version=99)),
        ("unknown kind", lambda i: envelope(i, kind=f"rollout_sample_v{i}")),
        ("longer than max_seq_len", lambda i: envelope(
            i, tokens=_packed("i", [1] * (MAX_SEQ_LEN + 1 + i)), logprobs=_packed("f", [0.0] * (MAX_SEQ_LEN + 1 + i)),
            loss_mask=_packed("B", [0] * (MAX_SEQ_LEN + i) + [1]))),
        ("loss mask without a 1", lambda i: envelope(i, loss_mask=_packed("B", [0] * n))),
        ("loss mask value 2", lambda i: envelope(i, loss_mask=_packed("B", mask[:-1] + [2]))),
        ("not stamped by a worker", lambda i: envelope(i, sample_id="", group_id="", group_size=0)),
        ("unknown field", lambda i: envelope(i, surprise=i)),
        ("tokens as a list", lambda i: envelope(i, tokens=list(real.tokens))),
    ]
    for what, make in variants:
        for i in range(8):
            out.append((b"m", make(i), what))
    for i in range(16):  # a valid message under the wrong field name
        out.append((b"payload" if i % 2 else b"M", real_raw, "wrong field name"))
    # Sanity: none of these may decode into a valid, stamped, in-vocabulary sample.
    for field, value, what in out:
        if field != b"m":
            continue
        try:
            sample = decode(value, expect=RolloutRecord)
        except ValueError:
            continue
        assert (max(sample.tokens) >= VOCAB_SIZE or len(sample.tokens) > MAX_SEQ_LEN or not sample.sample_id), what
    return out
