"""Workers with many groups in flight, killed, added and stopped mid-run (docs/design.md
§15.50 Many groups in flight per worker; docs/design.md §15.52 Elastic workers: join any time,
leave with a SIGTERM). ``rlstream up`` with the
openai backend against a stand-in server whose requests take 2 s (bench/standin_server.py,
in this process), one worker holding up to 64 groups of 2:

1. the worker is SIGKILLed with at least 50 groups in flight: the producer re-dispatches
   every one of them once their heartbeats lapse (``up`` restarts the worker);
2. a worker started by hand (``rlstream worker runs/<id>/config.json``) joins and samples;
3. that worker, SIGTERMed with groups in flight, finishes them and exits 0;

and the run finishes with ``rlstream audit`` clean: no group lost, none trained twice."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fault_harness import assert_audit_clean, running_up, sigkill
from polling import wait_until
from rq import Queue
from rq.registry import StartedJobRegistry

from rlstream.core import bus, keys
from rlstream.core.connection import connect
from rlstream.core.embedded_redis import stored_password
from rlstream.core.messages import GroupRejected, GroupSampled

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from standin_server import StandinServer  # noqa: E402

RUN, IN_FLIGHT = "elastic", 50


def test_killed_added_and_stopped_workers_lose_no_group(tmp_path: Path) -> None:
    server = StandinServer("const:2.0", vocab_size=16)
    base = server.start()
    hand: subprocess.Popen | None = None
    try:
        with running_up(tmp_path, RUN, "--set", "max_steps=3", "--set", "prompt_groups_per_step=32",
                        "--set", "completions_per_prompt=2", "--set", "workers.count=1", "--set", "job_timeout=10",
                        "--set", 'inference.backend="openai"', "--set", f'inference.base_url="{base}/v1"',
                        "--set", "inference.max_concurrency=128") as up:
            wait_until(lambda: (up.run_dir / "redis" / "url").is_file(), 60, "the embedded redis", interval=0.2)
            url = (up.run_dir / "redis" / "url").read_text().strip()
            r = connect(url, password=stored_password(up.run_dir / "redis"))
            started = StartedJobRegistry(queue=Queue(keys.job_queue_name(RUN), connection=r))

            # 1. SIGKILL the only worker while it holds >= 50 groups.
            wait_until(lambda: len(started.get_job_ids()) >= IN_FLIGHT, 120, f"{IN_FLIGHT} groups in flight",
                       interval=0.05)
            (victim,) = up.child_pids("worker")
            sigkill(victim)
            stranded = set(started.get_job_ids())
            assert len(stranded) >= IN_FLIGHT

            # 2. A worker started by hand joins and samples.
            log = tmp_path / "hand-worker.log"
            with log.open("wb") as out:
                hand = subprocess.Popen([sys.executable, "-m", "rlstream.cli", "worker", up.config_path],
                                        cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            hand_id = f"{socket.gethostname()}-{hand.pid}"
            hand_name = f"rlstream-{RUN}-{hand_id}"

            def hand_sampled() -> bool:
                assert hand.poll() is None, log.read_text()[-3000:]
                return any(isinstance(m, GroupSampled) and m.worker_id == hand_id
                           for _, m in bus.iter_all_events(r, RUN))

            wait_until(hand_sampled, 120, "the hand-started worker to sample a group", interval=0.2)

            # 3. SIGTERM it while it holds groups: it finishes them and exits 0.
            def hand_busy() -> bool:
                return any(r.hget(f"rq:job:{job_id}", "worker_name") == hand_name.encode()
                           for job_id in started.get_job_ids())

            wait_until(hand_busy, 60, "the hand-started worker to hold groups", interval=0.05)
            hand.send_signal(signal.SIGTERM)
            assert hand.wait(60) == 0, log.read_text()[-3000:]
            assert "finishing" in log.read_text(), log.read_text()[-3000:]

            # Every group the killed worker held is sampled again, none rejected.
            lost = {job_id.removeprefix(f"{RUN}-") for job_id in stranded}

            def resampled() -> bool:
                events = [m for _, m in bus.iter_all_events(r, RUN)]
                assert not lost & {m.group_id for m in events if isinstance(m, GroupRejected)}, up.logs()
                return lost <= {m.group_id for m in events if isinstance(m, GroupSampled)}

            wait_until(resampled, 120, "the killed worker's groups to be sampled again", interval=0.5)
            r.close()
            assert up.wait_exit(timeout=180) == 0, up.logs()
        assert_audit_clean(up.run_dir, tmp_path)
    finally:
        if hand is not None and hand.poll() is None:
            hand.kill()
            hand.wait()
        server.stop()
