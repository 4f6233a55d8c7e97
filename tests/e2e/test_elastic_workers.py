"""Workers with many groups in flight, killed, added and stopped mid-run (docs/design.md
§15.50 Many groups in flight per worker; docs/design.md §15.52 Elastic workers: join any time,
leave with a SIGTERM). ``rlstream up`` with the
openai backend against a stand-in server whose requests take 2 s (bench/standin_server.py,
in this process), one worker holding up to 50 groups of 2:

1. once the worker holds 50 groups, the server holds every new request (``StandinServer.hold``):
   nobody's groups finish, so the queue keeps groups for a worker that joins however slowly it
   starts (before, ``up``'s restarted worker could sample the whole rest of the run before the
   hand-started one took any on a loaded machine);
2. a worker started by hand (``rlstream worker runs/<id>/config.json``) joins and takes groups;
3. the first worker is SIGKILLed with 50 groups in flight, and the server answers again: the
   producer re-dispatches every one of them once their heartbeats lapse (``up`` restarts the
   worker);
4. the hand-started worker, SIGTERMed with groups in flight, finishes them and exits 0;

and the run, which ends when its 160 rows are all settled, finishes with every group the
killed worker held sampled again and ``rlstream audit`` clean: no group lost, none trained twice."""
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
from rlstream.core.messages import GroupSampled
from rlstream.core.run_state import RunState
from rlstream.ops.status import opened_run

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
        with running_up(tmp_path, RUN, "--set", "max_rows=160", "--set", "max_steps=100",
                        "--set", "prompt_groups_per_step=32",
                        "--set", "completions_per_prompt=2", "--set", "workers.count=1",
                        # a minute: the held groups must not time out while the hand-started worker starts
                        "--set", "job_timeout=60",
                        # O = 4: the 5 steps of 160 rows never leave a re-dispatched group past the staleness
                        # bound (with O = 1 a loaded machine let the trainer pass it while one was stranded)
                        "--set", "max_head_offpolicy_versions=4",
                        "--set", 'inference.backend="openai"', "--set", f'inference.base_url="{base}/v1"',
                        "--set", "inference.max_concurrency=128",
                        # a fixed window of 128 requests, 50 groups held at once (the default adaptive one starts
                        # at 16): 160 rows are more than two workers hold, so the queue keeps some for the second
                        "--set", 'workers.concurrency_control="fixed"',
                        "--set", f"workers.max_groups_held={IN_FLIGHT}") as up:
            wait_until(lambda: (up.run_dir / "redis" / "url").is_file(), 60, "the embedded redis", interval=0.2)
            url = (up.run_dir / "redis" / "url").read_text().strip()
            r = connect(url, password=stored_password(up.run_dir / "redis"))
            started = StartedJobRegistry(queue=Queue(keys.job_queue_name(RUN), connection=r))

            # 1. The only worker holds 50 groups; from now on no request is answered.
            wait_until(lambda: len(started.get_job_ids()) >= IN_FLIGHT, 120, f"{IN_FLIGHT} groups in flight",
                       interval=0.05)
            server.hold()
            (victim,) = up.child_pids("worker")
            victim_name = f"rlstream-{RUN}-{socket.gethostname()}-{victim}"

            # 2. A worker started by hand joins and takes groups (left in the queue: nothing finishes).
            log = tmp_path / "hand-worker.log"
            with log.open("wb") as out:
                hand = subprocess.Popen([sys.executable, "-m", "rlstream.cli", "worker", up.config_path],
                                        cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            hand_id = f"{socket.gethostname()}-{hand.pid}"

            def jobs_of(worker_name: str) -> set[str]:
                return {job_id for job_id in started.get_job_ids()
                        if r.hget(f"rq:job:{job_id}", "worker_name") == worker_name.encode()}

            def hand_jobs() -> set[str]:
                assert hand.poll() is None, log.read_text()[-3000:]
                return jobs_of(f"rlstream-{RUN}-{hand_id}")

            held = wait_until(hand_jobs, 120, "the hand-started worker to hold groups", interval=0.05)

            # 3. SIGKILL the first worker while it holds its groups; the server answers again.
            stranded = jobs_of(victim_name)
            assert len(stranded) >= IN_FLIGHT, (len(stranded), victim_name)
            sigkill(victim)
            server.release()

            # 4. SIGTERM the hand-started worker: it finishes its groups (they are sampled by it) and exits 0.
            hand.send_signal(signal.SIGTERM)
            assert hand.wait(60) == 0, log.read_text()[-3000:]
            r.close()
            assert up.wait_exit(timeout=180) == 0, up.logs()

        # The finished run's history (its embedded Redis restarted from the AOF for the query).
        with opened_run(str(up.run_dir), str(tmp_path / "runs")) as (_, _, finished):
            events = [m for _, m in bus.iter_all_events(finished, RUN)]
        sampled: dict[str, str] = {}
        for m in events:
            if isinstance(m, GroupSampled):
                sampled.setdefault(m.group_id, m.worker_id)  # the first one counts, as in the fold
        # the rejections that stand (docs/design.md §15.98 A written group is the trainer's to settle)
        fold = RunState()
        for m in events:
            fold.apply(m)
        rejected = set(fold.rejected)
        held_groups = {job_id.removeprefix(f"{RUN}-") for job_id in held}
        assert all(sampled.get(g) == hand_id for g in held_groups), (held_groups, log.read_text()[-3000:])
        lost = {job_id.removeprefix(f"{RUN}-") for job_id in stranded}  # the killed worker's groups
        assert lost <= set(sampled) and not lost & rejected, (lost - set(sampled), lost & rejected)
        assert_audit_clean(up.run_dir, tmp_path)
    finally:
        if hand is not None and hand.poll() is None:
            hand.kill()
            hand.wait()
        server.stop()
