"""The run's Prometheus exporter (rlstream/ops/metrics_exporter.py) against fakeredis: what it
serves, the name mapping, incremental and bounded reads, a Redis that is down, the restarts by
role, and the dashboard and alert rules in docs/ops/ naming only metrics it serves."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis
from ops_docs import alert_exprs, dashboard_exprs, named_metrics
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from rlstream.core import bus, fold_snapshot, keys
from rlstream.core.config import Config
from rlstream.core.messages import GroupAdmitted, GroupRejected, GroupSampled, StepCommitted, group_id_for
from rlstream.core.run_state import RunState
from rlstream.ops import metrics_exporter as mx
from rlstream.ops.restarts import ROLES, RestartLog, restart_counts

REPO = Path(__file__).resolve().parents[2]
RUN = "mx"
METRICS_LINE = json.loads((REPO / "tests" / "data" / "metrics-line.json").read_text())  # a real run's step line


def admit(r, row: int, size: int = 4) -> str:
    gid = group_id_for(0, row, 0)
    bus.xadd(r, keys.events(RUN), GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0, submit_version=0,
                                                 group_size=size))
    return gid


def commit(r, step: int, group_ids: list[str]) -> str:
    event_id = bus.as_text(bus.xadd(r, keys.events(RUN), StepCommitted(
        step=step, version=step, entry_ids=[], sample_ids=[], group_ids=group_ids,
        metrics={"rollout/reward_mean": 0.25 * step})))
    r.hset(keys.committed_step(RUN), mapping={"step": step, "event_id": event_id})
    return event_id


def scrape(collector: mx.RunCollector) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels without run_id): value} of one scrape, through the text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            assert s.labels["run_id"] == RUN
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "run_id")))] = s.value
    return out


def served_names(values: dict) -> set[str]:
    return {name for name, _ in values}


@pytest.fixture
def run_dir(tmp_path) -> Path:
    (tmp_path / "metrics.jsonl").write_text(json.dumps(METRICS_LINE) + "\n")
    return tmp_path


def test_mapping_rule_and_reason_classes():
    assert mx.metric_name("rollout/reward_mean") == "rlstream_rollout_reward_mean"
    assert mx.metric_name("rollout/response_len/max") == "rlstream_rollout_response_len_max"
    assert mx.metric_name("eval/pass@1") == "rlstream_eval_pass_1"
    from rlstream.trainer.staleness import STALE_PREFIX
    from rlstream.workers.checks import group_rejection

    assert mx.reject_class(f"{STALE_PREFIX} sampled with v1, trainer at v4") == "stale"
    assert mx.reject_class(group_rejection(1, 4, 2, "ValueError: boom")) == "draws_failed"
    assert mx.reject_class(group_rejection(0, 4, 2, "")) == "draws_failed"
    assert mx.reject_class("row 7: the prompt could not be tokenized: x") == "unusable_row"
    assert mx.reject_class("rollout job failed: Traceback") == "job_failed"
    assert mx.reject_class("job lost; re-dispatched 3 times already") == "stranded"
    assert mx.reject_class("incomplete: 1 of 4 samples valid") == "incomplete"
    assert mx.reject_class("my filter said no") == "other"


def test_a_scrape_serves_the_fold_the_queues_and_the_training_metrics(r, run_dir):
    g0, _, g2 = admit(r, 0), admit(r, 1), admit(r, 2)
    bus.xadd(r, keys.events(RUN), GroupSampled(group_id=g0, samples=4, tokens=12))
    bus.xadd(r, keys.events(RUN), GroupRejected(group_id=g2, reason="stale: sampled with v0", by="trainer"))
    commit(r, 1, [g0])
    r.hincrby(keys.rollout_stats(RUN), keys.ROLLOUT_FAILURES, 3)
    r.hincrby(keys.rollout_stats(RUN), keys.GATE_CLOSED_MS, 1500)
    r.rpush(f"rq:queue:{keys.job_queue_name(RUN)}", "job-a", "job-b")
    r.xadd(keys.dead(RUN), {"reason": "bad"})
    (run_dir / "archive").mkdir()
    (run_dir / "archive" / "seg-1.jsonl").write_bytes(b"x" * 1234)
    cfg = Config(run_id=RUN, prompt_groups_per_step=1, completions_per_prompt=4)
    v = scrape(mx.RunCollector(cfg, r, run_dir))

    assert v[("rlstream_step", ())] == 1 and v[("rlstream_redis_up", ())] == 1
    assert v[("rlstream_groups_admitted_total", ())] == 3 and v[("rlstream_groups_trained_total", ())] == 1
    assert v[("rlstream_groups_rejected_total", (("reason", "stale"),))] == 1
    assert v[("rlstream_groups_rejected_total", (("reason", "other"),))] == 0  # every class is served
    assert v[("rlstream_in_flight_groups", ())] == 1 and v[("rlstream_unsampled_groups", ())] == 1
    assert v[("rlstream_samples_sampled_total", ())] == 4 and v[("rlstream_tokens_sampled_total", ())] == 12
    assert v[("rlstream_queued_jobs", ())] == 2
    assert v[("rlstream_dead_letters", ())] == 1 and v[("rlstream_stream_entries", (("stream", "dead"),))] == 1
    assert v[("rlstream_worker_rollout_failures_total", ())] == 3
    assert v[("rlstream_gate_closed_seconds_total", ())] == 1.5
    assert v[("rlstream_archive_bytes", ())] == 1234
    assert v[("rlstream_last_step_timestamp_seconds", ())] > 1.6e9
    assert v[("rlstream_samples_per_second", ())] == pytest.approx(4 / 60, abs=1e-3)  # the events are seconds old
    assert {v[("rlstream_restarts_total", (("role", role),))] for role in ROLES} == {0}
    # the training metrics: the last training line of metrics.jsonl, by the mapping rule
    assert v[("rlstream_rollout_reward_mean", ())] == METRICS_LINE["rollout/reward_mean"]
    assert v[("rlstream_train_loss", ())] == METRICS_LINE["train/loss"]
    assert v[("rlstream_training_metrics_step", ())] == METRICS_LINE["step"]
    assert ("rlstream_version", ()) not in v  # keys without a namespace are the exporter's own (step, version)


def test_every_native_metric_is_served(r, run_dir):
    commit(r, 1, [admit(r, 0)])
    served = served_names(scrape(mx.RunCollector(Config(run_id=RUN), r, run_dir)))
    missing = {n for n in mx.native_names() if n not in served}
    # fakeredis has no INFO memory: the two Redis memory gauges are checked by the e2e test
    assert missing == {"rlstream_redis_memory_used_bytes", "rlstream_redis_memory_max_bytes"}


def test_the_fold_is_incremental_and_starts_from_the_snapshot(r, run_dir, monkeypatch):
    g0 = admit(r, 0)
    cursor = commit(r, 1, [g0])
    state = RunState()
    for _, msg in bus.iter_all_events(r, RUN):
        state.apply(msg)
    (run_dir / "checkpoints" / "step-1").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-1" / fold_snapshot.FOLD_FILE).write_text(
        fold_snapshot.dump(state, cursor=cursor, commit_id=cursor, step=1, metrics_bytes=0))
    reads: list[str] = []
    real_xread = r.xread
    monkeypatch.setattr(r, "xread", lambda streams, **kw: (reads.append(next(iter(streams.values()))),
                                                           real_xread(streams, **kw))[1])
    collector = mx.RunCollector(Config(run_id=RUN), r, run_dir)
    assert scrape(collector)[("rlstream_step", ())] == 1
    assert reads[0] == cursor  # from the snapshot's cursor, not from the stream's start
    reached = collector.cursor
    commit(r, 2, [admit(r, 1)])
    reads.clear()
    v = scrape(collector)
    assert v[("rlstream_step", ())] == 2 and v[("rlstream_groups_trained_total", ())] == 2
    assert reads[0] == reached  # from where the last scrape stopped


def test_a_scrape_is_bounded_while_the_fold_catches_up(r, run_dir, monkeypatch):
    for row in range(3):
        admit(r, row)
    monkeypatch.setattr(mx, "FOLD_BUDGET_S", 0.0)
    collector = mx.RunCollector(Config(run_id=RUN), r, run_dir)
    v = scrape(collector)
    assert v[("rlstream_exporter_events_caught_up", ())] == 0 and v[("rlstream_groups_admitted_total", ())] == 0
    monkeypatch.setattr(mx, "FOLD_BUDGET_S", 2.0)
    v = scrape(collector)
    assert v[("rlstream_exporter_events_caught_up", ())] == 1 and v[("rlstream_groups_admitted_total", ())] == 3


def test_a_redis_that_is_down_still_gets_an_answer(run_dir):
    down = mx.exporter_client("redis://127.0.0.1:1/0", None)  # nothing listens on port 1
    v = scrape(mx.RunCollector(Config(run_id=RUN), down, run_dir))
    assert v[("rlstream_redis_up", ())] == 0
    assert v[("rlstream_exporter_section_errors_total", (("section", "redis"),))] == 1
    assert v[("rlstream_rollout_reward_mean", ())] == METRICS_LINE["rollout/reward_mean"]  # the file is still read
    assert ("rlstream_step", ()) not in v


def test_metrics_jsonl_is_read_from_where_the_last_scrape_stopped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "train/loss": 1.0}) + "\n" + json.dumps({"eval/version": 1, "eval/x": 2})
                    + "\n" + '{"step": 2, "train/lo')  # a line still being written
    tail = mx.MetricsTail(path)
    tail.read()
    assert tail.train == {"step": 1, "train/loss": 1.0} and tail.evaluation == {"eval/version": 1, "eval/x": 2}
    with path.open("a") as f:
        f.write('ss": 0.5}\n')
    tail.read()
    assert tail.train == {"step": 2, "train/loss": 0.5}
    path.write_text(json.dumps({"step": 1, "train/loss": 9.0}) + "\n")  # rewritten (shorter): read anew
    tail.read()
    assert tail.train == {"step": 1, "train/loss": 9.0}


def test_a_training_key_never_shadows_an_exporter_name(r, tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "groups/admitted": 99, "queued/jobs": 5,
                                                        "rollout/a.b": 1, "rollout/a_b": 2}) + "\n")
    v = scrape(mx.RunCollector(Config(run_id=RUN), r, tmp_path))
    assert v[("rlstream_groups_admitted_total", ())] == 0 and v[("rlstream_queued_jobs", ())] == 0
    assert v[("rlstream_rollout_a_b", ())] == 1  # two keys, one name: the first (sorted) wins


def test_restarts_are_observed_and_kept_until_redis_takes_them(r):
    class Proc:
        pass

    class Child:
        def __init__(self, name, role):
            self.name, self.role, self.process = name, role, Proc()

    class Embedded:
        process = Proc()

    trainer, worker, embedded = Child("trainer", "trainer"), Child("worker-0", "worker"), Embedded()
    restarts = RestartLog(RUN)
    restarts.observe(r, [trainer, worker], [], embedded)  # first sight: no restart
    assert restart_counts(r, RUN) == dict.fromkeys(ROLES, 0)
    worker.process, embedded.process = Proc(), Proc()
    down = mx.exporter_client("redis://127.0.0.1:1/0", None)
    restarts.observe(down, [trainer, worker], [], embedded)  # Redis is down: kept
    worker.process = Proc()
    restarts.observe(r, [trainer, worker], [], embedded)
    assert restart_counts(r, RUN) == {**dict.fromkeys(ROLES, 0), "worker": 2, "redis": 1}


def test_the_exporter_serves_http(r, run_dir):
    exporter = mx.Exporter(mx.RunCollector(Config(run_id=RUN), r, run_dir), "127.0.0.1", 0)
    try:
        reply = httpx.get(exporter.url, timeout=10)
        assert reply.status_code == 200 and 'rlstream_step{run_id="mx"} 0.0' in reply.text
    finally:
        exporter.close()


# --------------------------------------------------------------------------- docs/ops: dashboard and alerts
def test_every_dashboard_and_alert_metric_is_served(r, run_dir):
    commit(r, 1, [admit(r, 0)])
    served = served_names(scrape(mx.RunCollector(Config(run_id=RUN), r, run_dir)))
    served |= {"rlstream_redis_memory_used_bytes", "rlstream_redis_memory_max_bytes"}  # (not on fakeredis)
    assert len(dashboard_exprs()) >= 15 and len(alert_exprs()) >= 5
    named = named_metrics()
    assert named and named <= served, sorted(named - served)
    for must in ("rlstream_restarts_total", "rlstream_dead_letters", "rlstream_redis_memory_used_bytes",
                 "rlstream_last_step_timestamp_seconds"):
        assert any(must in e for e in alert_exprs()), must


def test_the_operating_page_lists_every_native_metric():
    page = (REPO / "docs" / "operating.md").read_text()
    listed = set(re.findall(r"^\| `(rlstream_[a-z0-9_]+)`", page, re.M))
    assert listed == mx.native_names()


def test_help_and_the_cli_do_not_import_prometheus_client():
    code = ("import sys, rlstream.cli as c; c.build_parser(); "
            "assert 'prometheus_client' not in sys.modules, 'prometheus_client imported'; "
            "from rlstream.ops import metrics_exporter as m; "
            "assert c.build_parser().parse_args(['metrics', 'x']).port == m.DEFAULT_PORT")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_the_exporter_client_fails_fast():
    client = mx.exporter_client("redis://127.0.0.1:1/0", None)
    with pytest.raises(redis.ConnectionError):
        client.ping()
