"""End to end with ``inference.backend = "openai"``: workers sample from an OpenAI-compatible
server over HTTP (tests/e2e/openai_server.py serving the tiny model) and push each new
version to it through ``weight_sync_url``. Strict on-policy admission (O = 0) makes the
weight sync observable: every sample must be stamped with the trainer's version, and the
server's behaviour logprobs must equal the trainer's (TIS weight 1), which they only do if
the server really serves the weights of that version."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from factories import rlstream
from polling import wait_until

from rlstream.core.metrics import read_metrics

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "builtin" / "config.toml"


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float) -> str:
    def written() -> str:
        if proc.poll() is not None:  # its stderr is only read once it exited: reading a live pipe would block
            raise AssertionError(f"inference server did not start: {proc.stderr.read() if proc.stderr else ''}")
        return path.read_text().strip() if path.is_file() else ""

    return wait_until(written, timeout, f"the inference server to write {path}", interval=0.1)


def test_workers_sample_from_an_openai_compatible_server(tmp_path: Path) -> None:
    from rlstream.builtin.tiny_model import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    port_file = tmp_path / "server.port"
    server = subprocess.Popen([sys.executable, str(REPO / "tests/e2e/openai_server.py"), str(model_dir),
                               str(port_file)],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        port = wait_for_file(port_file, server, timeout=60)
        base = f"http://127.0.0.1:{port}"
        proc = rlstream("up", str(CONFIG), "--run-id", "remote",
                        "--set", f'base_model="{model_dir}"', "--set", "max_steps=4",
                        "--set", "prompt_groups_per_step=4",
                        "--set", "completions_per_prompt=4", "--set", "workers.count=1",
                        "--set", "max_head_offpolicy_versions=0", "--set", 'inference.backend="openai"',
                        "--set", f'inference.base_url="{base}/v1"',
                        "--set", f'inference.weight_sync_url="{base}/update_weights_from_disk"', cwd=tmp_path)
    finally:
        server.kill()
        server.wait()
    run_dir = tmp_path / "runs" / "remote"
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((run_dir / "logs").glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    worker_log = (run_dir / "logs" / "worker-0.log").read_text()
    assert "openai policy at v0" in worker_log
    assert "Unclosed" not in worker_log  # its aiohttp session closed at exit (WorkerRuntime.close)

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["async/version_offset_max"] == 0 for r in rows), [r["async/version_offset_max"] for r in rows]
    for r in rows:  # the server's logprobs are the trainer's: it serves exactly that version
        assert abs(r["train/tis/weight_mean"] - 1.0) < 1e-3, r

    updates = [json.loads(line) for line in port_file.with_name("server.port.updates").read_text().splitlines()]
    # Each new version pushed once, in order (v4 only if a job started after it was published).
    assert [u["version"] for u in updates] in ([1, 2, 3], [1, 2, 3, 4]), updates
    assert all(Path(u["model_path"]).name == f"v{u['version']}" for u in updates), updates
