"""A flaky network to Redis, end to end (docs/design.md §10 Failure semantics, docs/operating.md
"Faults"): every role of an ``rlstream up`` reaches Redis through a TCP proxy (tests/flaky_proxy.py)
that, on a seeded schedule, delays bytes, cuts established connections mid-command and refuses new
ones for a while. The run must cost time, never samples: it finishes its steps, ``rlstream audit``
exits 0 (no group lost, none trained twice), and nothing hangs past the test's deadline.

Redis is a redis-server of our own on a loopback TCP port (the embedded one listens on a unix
socket, which a TCP proxy cannot sit in front of); ``up`` is given the proxy's address as an
external Redis (``RLSTREAM_REDIS_URL``), so its supervisor, the trainer, the producer and the
workers all go through the proxy.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from fault_harness import assert_audit_clean, assert_steps_exactly, assert_summary, running_up
from flaky_proxy import FlakyProxy, Schedule

from rlstream.core.credentials import PASSWORD_ENV
from rlstream.core.embedded_redis import EmbeddedRedis

pytestmark = pytest.mark.e2e
STEPS = 16
# About once a second half the connections are cut and new ones refused for up to 1.5 s (40 %); a
# tenth of the chunks is delayed up to 0.4 s; 3 % of the server's replies are lost with their
# connection (the command ran; the client sends it again).
SCHEDULE = Schedule(cut_every_s=1.0, cut_p=0.5, refuse_p=0.4, refuse_max_s=1.5, delay_p=0.1, delay_max_s=0.4,
                    lose_reply_p=0.03)


class TcpRedis(EmbeddedRedis):
    """The embedded server's binary and settings, on a loopback port instead of a unix socket."""

    def _socket_path(self):
        return None


def test_flaky_network_to_redis_costs_time_not_samples(tmp_path: Path) -> None:
    server = TcpRedis(tmp_path / "redis-data")
    server.start()
    try:
        with FlakyProxy(("127.0.0.1", server.port), seed=1, schedule=SCHEDULE, chaos=False) as proxy:
            url = f"redis://:{server.password}@127.0.0.1:{proxy.port}/0"
            env = {"RLSTREAM_REDIS_URL": url}
            with running_up(tmp_path, "flaky", "--set", f"max_steps={STEPS}", "--set", "prompt_groups_per_step=8",
                            "--set", "completions_per_prompt=4", "--set", "workers.count=2",
                            "--set", "job_timeout=20", env=env) as up:
                up.wait_steps(1, timeout=120)
                proxy.set_chaos(True)  # faults from the first step on: the start is not what is tested
                started = time.monotonic()
                code = up.wait_exit(timeout=240)
                proxy.set_chaos(False)
                chaotic_s = time.monotonic() - started
                faults = dict(proxy.stats)
                print("proxy faults:", faults, f"{chaotic_s:.1f} s")
                assert code == 0, f"{faults}\n{up.logs()}"
                assert_summary(up, STEPS)
            # The schedule really hit the run: connections cut mid-flight, new ones refused.
            assert faults.get("cut", 0) >= 3 and faults.get("refused", 0) >= 1, (faults, chaotic_s)
            run_dir = up.run_dir
            assert_steps_exactly(run_dir, STEPS)
            # A success whose reply was lost is still a success: rq ran its MULTI again, found the job
            # deleted and used to fail it ("Failed to retrieve status"), which re-ran its groups.
            for log in sorted((run_dir / "logs").glob("worker-*.log")):
                text = log.read_text(errors="replace")
                assert "InvalidJobOperation" not in text, (log.name, text[-3000:])
            assert_audit_clean(run_dir, tmp_path, f"{faults}\n", env={PASSWORD_ENV: server.password})
    finally:
        server.stop()
