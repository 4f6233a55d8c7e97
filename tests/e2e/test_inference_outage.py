"""The inference server gone, end to end (docs/design.md §10 Failure semantics, docs/operating.md
"Faults"): during a run with ``inference.backend = "openai"`` the OpenAI-compatible server
(tests/e2e/openai_server.py) is killed, refuses connections for ``OUTAGE_S``, and comes back on
the same port with its base weights, as a restarted engine would. Workers must wait within their
bounds (``inference.start_timeout``; the job's ``job_timeout``), the run must go on and finish with
``rlstream audit`` at 0, and the restarted server must be told the run's current weights before it
serves again: strict on-policy admission (O = 0) makes that observable, since the server's
behaviour logprobs must equal the trainer's (TIS weight 1) on every step.

The outage is ``OUTAGE_S`` = 20 s to keep the suite short; a minute behaves the same while it
stays under ``job_timeout`` (60 s by default): beyond it a waiting job is timed out and rq runs
it again (``JOB_RETRIES``), then its groups are rejected with the reason, and the producer admits
new ones once the server is back.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_harness import assert_audit_clean, assert_steps_exactly, assert_summary, running_up
from test_openai_backend import wait_for_file

from rlstream.core.metrics import read_metrics

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
OUTAGE_S = 20.0
STEPS = 6


def start_server(model_dir: Path, port_file: Path, port: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tests/e2e/openai_server.py"), str(model_dir), str(port_file),
                             str(port)], cwd=REPO, stderr=subprocess.PIPE, text=True)


def test_inference_server_outage_is_waited_out(tmp_path: Path) -> None:
    from rlstream.builtin.tiny_model import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    first_port_file, second_port_file = tmp_path / "first.port", tmp_path / "second.port"
    server = start_server(model_dir, first_port_file)
    try:
        port = int(wait_for_file(first_port_file, server, timeout=60))
        base = f"http://127.0.0.1:{port}"
        with running_up(tmp_path, "outage", "--set", f'base_model="{model_dir}"', "--set", f"max_steps={STEPS}",
                        "--set", "prompt_groups_per_step=4", "--set", "completions_per_prompt=4",
                        "--set", "workers.count=2", "--set", "max_head_offpolicy_versions=0",
                        "--set", 'inference.backend="openai"', "--set", f'inference.base_url="{base}/v1"',
                        "--set", f'inference.weight_sync_url="{base}/update_weights_from_disk"') as up:
            up.wait_steps(2, timeout=120)
            server.kill()  # connections refused from now on
            server.wait()
            down_at = time.monotonic()
            time.sleep(OUTAGE_S)
            assert up.proc.poll() is None, f"the run ended while the server was down\n{up.logs()}"
            steps_during_outage = up.steps()  # = the version the run serves: O = 0 admits nothing newer
            server = start_server(model_dir, second_port_file, port)
            wait_for_file(second_port_file, server, timeout=60)
            outage_s = time.monotonic() - down_at
            code = up.wait_exit(timeout=180)
            assert code == 0, up.logs()
            assert_summary(up, STEPS)
        run_dir = up.run_dir
        assert steps_during_outage < STEPS, "the outage came after the run's last step: it tested nothing"
        assert_steps_exactly(run_dir, STEPS)
        assert_audit_clean(run_dir, tmp_path)
        worker_logs = "\n".join(p.read_text(errors="replace") for p in sorted((run_dir / "logs").glob("worker-*.log")))
        assert "stopped answering" in worker_logs, worker_logs[-3000:]

        # The restarted server came back with its base weights: a worker must sync it to the run's
        # version before it serves again. Otherwise its samples carry the newest version's stamp
        # but the base model's logprobs, which the trainer's importance weights show.
        updates = [json.loads(line) for line in second_port_file.with_name("second.port.updates").read_text()
                   .splitlines()] if second_port_file.with_name("second.port.updates").is_file() else []
        assert updates and updates[0]["version"] == steps_during_outage, (updates, steps_during_outage, outage_s)
        rows = read_metrics(run_dir / "metrics.jsonl")
        assert all(r["async/version_offset_max"] == 0 for r in rows), [r["async/version_offset_max"] for r in rows]
        for r in rows:
            assert abs(r["train/tis/weight_mean"] - 1.0) < 1e-3, (r["step"], r["train/tis/weight_mean"], updates)
    finally:
        server.kill()
        server.wait()
