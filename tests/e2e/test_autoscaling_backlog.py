"""The autoscaling recipe's signal, end to end (docs/operating.md, Autoscaling workers): the list
KEDA's redis scaler reads (LLEN of the run's rq queue, served as ``rlstream_queued_jobs`` too)
rises with the backlog; a test-side autoscaler starts a third worker (``rlstream worker``, as a
new replica would) when it crosses a bound; once the rows run out the list drains, and the added
worker, SIGTERMed as a scale-down does, finishes its groups and exits 0; the run finishes and
audits clean. (While the workers are the bottleneck the producer keeps the list at the staleness
gate's limit, which is what tells an autoscaler that more workers would help.)"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from fault_harness import assert_audit_clean, running_up
from polling import wait_until

from rlstream.core import bus, keys
from rlstream.core.connection import connect
from rlstream.core.embedded_redis import stored_password
from rlstream.core.messages import GroupSampled
from rlstream.ops.status import opened_run

pytestmark = pytest.mark.e2e
RUN, BOUND = "scaled", 4  # queued jobs that make the autoscaler add a worker (KEDA's listLength)
HERE = str(Path(__file__).parent)  # slow_rollout.py


def test_a_worker_added_on_the_backlog_drains_it_and_leaves_on_sigterm(tmp_path: Path) -> None:
    env = {"RLSTREAM_TEST_ROLLOUT_DELAY_S": "0.3",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), HERE) if p)}
    added: subprocess.Popen | None = None
    try:
        with running_up(tmp_path, RUN, "--set", "max_rows=64", "--set", "epochs=1", "--set", "max_steps=100",
                        "--set", "prompt_groups_per_step=8",
                        "--set", "completions_per_prompt=4", "--set", "workers.count=2",
                        "--set", "workers.groups_per_job=1", "--set", "max_head_offpolicy_versions=2",
                        "--set", "job_timeout=20", "--set", 'rollout_fn_factory="slow_rollout:factory"',
                        env=env) as up:
            wait_until(lambda: (up.run_dir / "redis" / "url").is_file(), 60, "the embedded redis", interval=0.2)
            r = connect((up.run_dir / "redis" / "url").read_text().strip(),
                        password=stored_password(up.run_dir / "redis"))
            queue = f"rq:queue:{keys.job_queue_name(RUN)}"  # what the ScaledObject's listName names

            peak = wait_until(lambda: (n := r.llen(queue)) >= BOUND and n, 120, f"{BOUND} queued jobs", interval=0.1)
            log = tmp_path / "added-worker.log"
            with log.open("wb") as out:
                added = subprocess.Popen([sys.executable, "-m", "rlstream.cli", "worker", up.config_path],
                                         cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env={**os.environ, **env})
            added_id = f"{socket.gethostname()}-{added.pid}"

            def drained() -> bool:
                """The list is empty (the producer admits no more than the gate lets in; three
                workers keep up), or the run is over (its Redis gone with it)."""
                if up.proc.poll() is not None:
                    return True
                try:
                    after.append(r.llen(queue))
                except redis.ConnectionError:
                    return up.proc.poll() is not None
                return after[-1] == 0

            after: list[int] = []  # the list's length while three workers run
            wait_until(drained, 180, "the backlog to drain with three workers", interval=0.1)
            if added.poll() is None:
                added.send_signal(signal.SIGTERM)  # scale-down: it finishes what it holds, then exits 0
            assert added.wait(60) == 0, log.read_text()[-3000:]
            r.close()
            assert up.wait_exit(timeout=180) == 0, up.logs()

        with opened_run(str(up.run_dir), str(tmp_path / "runs")) as (_, _, finished):
            by_added = [m for _, m in bus.iter_all_events(finished, RUN)
                        if isinstance(m, GroupSampled) and m.worker_id == added_id]
        assert peak >= BOUND and by_added, (peak, len(by_added), log.read_text()[-2000:])
        # The rows run out (max_rows, one epoch): admissions end and the three workers empty the list
        # while the trainer still trains its last groups.
        assert after and after[-1] == 0, after
        assert_audit_clean(up.run_dir, tmp_path)
    finally:
        if added is not None and added.poll() is None:
            added.kill()
            added.wait()
