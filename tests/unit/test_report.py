"""``rlstream report``: the page drawn from a fabricated metrics.jsonl (perf keys, an older run
without them, evaluation lines) opens, every plot decodes, and matplotlib stays out of the CLI's
import path."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from report_pages import open_report

from rlstream import cli
from rlstream.core.errors import ConfigError
from rlstream.ops.report import render, step_breakdown

SECTIONS = ["Reward", "Version offsets (how many versions behind the trained policy)", "Rollout throughput (samples/s)",
            "Rollout throughput (tokens/s)", "Where each step's wall time went", "Evaluation"]


def write_metrics(run_dir, perf: bool = True, evals: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, 13):
        row = {"step": step, "version": step, "rollout/reward_mean": step / 12, "rollout/accuracy": step / 12,
               "async/version_offset_mean": 0.5, "async/version_offset_max": 1.0, "async/submit_offset_max": 1,
               "perf/train_wait_time": 0.4, "perf/step_time": 0.6}
        if perf:
            row.update({"perf/step_wall_time": 1.0, "perf/trainer_wait_for_sampler_time": 0.4,
                        "perf/weight_sync_time": 0.1, "perf/rollout_samples_per_s": 200.0 + step,
                        "perf/rollout_tokens_per_s": 3000.0, "perf/overlap_ratio": 0.6})
        if perf and step > 6:  # the cookbook's names (0.2.0): step_time is the wall time, train_time the work
            row.update({"perf/step_time": 1.0, "perf/train_time": 0.5, "perf/train_wait_time": 0.5,
                        "perf/weight_update_time": 0.1})
            del row["perf/step_wall_time"], row["perf/weight_sync_time"]
        lines.append(row)
        if evals and step % 4 == 0:
            lines.append({"step": step, "version": step, "eval/version": step, "eval/accuracy": step / 20})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_report_of_a_run_with_every_family_opens_with_every_plot(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    write_metrics(run_dir)
    (run_dir / "config.json").write_text("{}")
    assert cli.run(["report", "r1", "--log-path", str(tmp_path / "runs")]) == 0
    headings, images, missing = open_report(run_dir / "report.html")
    assert headings == SECTIONS and missing == []
    assert set(images) == set(SECTIONS)
    assert all(w >= 500 and h >= 200 for w, h in images.values())
    text = (run_dir / "report.html").read_text()
    assert "trainer idle share (waiting for rollouts)</th><td>40.0%" in text


def test_an_older_run_without_perf_keys_or_evaluations_still_reports(tmp_path):
    write_metrics(tmp_path, perf=False, evals=False)
    out = render(tmp_path, tmp_path / "page.html")
    headings, images, missing = open_report(out)
    assert headings == SECTIONS
    assert missing == ["Rollout throughput (samples/s)", "Rollout throughput (tokens/s)", "Evaluation"]
    assert "Where each step's wall time went" in images  # from perf/train_wait_time and perf/step_time


def test_step_breakdown_splits_the_wall_time():
    rows = [{"step": 1, "perf/step_wall_time": 2.0, "perf/trainer_wait_for_sampler_time": 0.5,
             "perf/weight_sync_time": 0.25}]
    assert step_breakdown(rows) == {"step": [1], "wait for rollouts": [0.5], "compute": [1.25], "write weights": [0.25]}
    cookbook = [{"step": 2, "perf/step_time": 2.0, "perf/train_time": 1.5, "perf/trainer_wait_for_sampler_time": 0.5,
                 "perf/weight_update_time": 0.25}]  # the cookbook's names: perf/step_time is the wall time
    assert step_breakdown(cookbook) == {"step": [2], "wait for rollouts": [0.5], "compute": [1.25],
                                        "write weights": [0.25]}


def test_a_run_without_metrics_says_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="no metrics in"):
        render(tmp_path)


def test_the_cli_does_not_import_matplotlib():
    code = "import sys; from rlstream import cli; cli.build_parser(); print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
