"""End to end: `rlstream up` with its Prometheus exporter on (metrics.port = 0: any free port, logged),
scraped over HTTP during the run: the step gauge moves, the training metrics and the Redis memory
gauges are there, and so is every metric the dashboard and the alert rules in docs/ops/ name."""
from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from fault_harness import running_up
from ops_docs import named_metrics
from polling import wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e
SHORT = ["--set", "max_steps=20", "--set", "prompt_groups_per_step=8", "--set", "completions_per_prompt=4",
         "--set", "metrics.port=0"]


def values(text: str) -> dict[str, float]:
    """{sample name: value} of the run's unlabelled-but-run_id series (the first of each name)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, s.value)
    return out


def test_up_serves_metrics_that_move_during_the_run(tmp_path: Path) -> None:
    with running_up(tmp_path, "metrics", *SHORT) as up:
        def metrics_url() -> str | None:
            if up.proc.poll() is not None:
                raise AssertionError(f"rlstream up exited with {up.proc.returncode} before serving\n{up.logs()}")
            found = re.search(r"metrics at (http://\S+/metrics)", up.stderr())
            return found.group(1) if found else None

        url = wait_until(metrics_url, 60, "up's 'metrics at' log line", interval=0.1)
        http = httpx.Client(timeout=10)
        seen: list[dict[str, float]] = []

        def scraped(predicate) -> dict[str, float] | None:
            if up.proc.poll() is not None:
                raise AssertionError(f"rlstream up exited before the metrics showed it\n{up.logs()}")
            reply = http.get(url)
            assert reply.status_code == 200, reply.text[:500]
            v = values(reply.text)
            seen.append(v)
            return v if predicate(v) else None

        first = wait_until(lambda: scraped(lambda v: v.get("rlstream_step", 0) >= 1 and "rlstream_train_loss" in v),
                           180, "a first step and its training metrics on /metrics", interval=0.2)
        moved = wait_until(lambda: scraped(lambda v: v["rlstream_step"] > first["rlstream_step"]), 180,
                           "the step gauge to move", interval=0.2)
        assert moved["rlstream_published_version"] >= 1 and moved["rlstream_redis_up"] == 1
        assert moved["rlstream_samples_sampled_total"] > 0 and moved["rlstream_redis_memory_used_bytes"] > 0
        for key in ("rlstream_rollout_reward_mean", "rlstream_train_loss", "rlstream_perf_step_wall_time",
                    "rlstream_async_version_offset_max"):
            assert key in moved, key
        missing = named_metrics() - set(moved)
        assert not missing, f"the dashboard or the alerts name metrics a live run does not serve: {sorted(missing)}"
        http.close()
        assert up.wait_exit(timeout=240) == 0, up.logs()
