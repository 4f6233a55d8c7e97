"""``rlstream status --json``: one JSON object with the backlog and the rates an operator or an
autoscaler reads (docs/operations.md "Status for operators and autoscalers"), the rates taken from the
events stream's entry ids (the Redis server's clock)."""
from __future__ import annotations

import json

import pytest
from factories import legacy_config

from rlstream import cli
from rlstream.core import bus, keys
from rlstream.core.codec import encode
from rlstream.core.credentials import PASSWORD_ENV
from rlstream.core.messages import GroupAdmitted, GroupSampled, RunFinished, StepCommitted, group_id_for
from rlstream.ops.status import collect_status

pytestmark = pytest.mark.integration


def add_at(r, run_id: str, ms: int, msg) -> None:
    r.xadd(keys.events(run_id), {bus.FIELD: encode(msg)}, id=f"{ms}-0")


def fill(r, run_id: str, finished: bool) -> None:
    t0 = 1_700_000_000_000
    for row in range(6):
        gid = group_id_for(0, row, 0)
        add_at(r, run_id, t0 + row * 10, GroupAdmitted(group_id=gid, row_index=row, epoch=0, attempt=0,
                                                       submit_version=0, group_size=4))
    for row in range(4):  # 4 groups of 4 samples (10 tokens each) over the last 60 s, one long before
        add_at(r, run_id, t0 + 200 + (0 if row == 0 else 100_000 + row * 1000),
               GroupSampled(group_id=group_id_for(0, row, 0), samples=4, tokens=40))
    add_at(r, run_id, t0 + 150_000, StepCommitted(step=1, version=1, entry_ids=[], sample_ids=[],
                                                  group_ids=[group_id_for(0, 1, 0)]))
    if finished:
        add_at(r, run_id, t0 + 151_000, RunFinished(reason="max_steps", step=1, version=1))


def test_rates_and_backlog_of_a_finished_run(r, run_id):
    fill(r, run_id, finished=True)
    r.hincrby(keys.rollout_stats(run_id), "gate_closed_ms", 2500)
    cfg = legacy_config(run_id=run_id, prompt_groups_per_step=1, completions_per_prompt=4)
    status = collect_status(cfg, r)
    # window: the 60 s up to the last sample or step (t0+150 s): 3 groups sampled, 1 step
    assert status["rates"] == {"window_s": 60.0, "samples_per_s": 0.2, "tokens_per_s": 2.0, "steps_per_s": 0.0167}
    backlog = status["backlog"]
    assert backlog["in_flight_groups"] == 5 and backlog["unsampled_groups"] == 2  # row 1 trained; rows 4, 5 unsampled
    # (v0 + O + 1) * B - reserved: B = 4, 6 groups of 4 reserved
    assert backlog["gate_headroom_samples"] == (cfg.offpolicy_versions + 1) * 4 - 24
    assert backlog["queued_jobs"] == 0 and backlog["started_jobs"] == 0
    assert status["gate_closed_s_total"] == 2.5 and "gate_closed_ms" not in status["rollout_errors"]


def test_a_running_run_counts_up_to_the_server_clock(r, run_id):
    fill(r, run_id, finished=False)  # every event is years old: nothing in the last minute
    rates = collect_status(legacy_config(run_id=run_id), r)["rates"]
    assert rates["samples_per_s"] == rates["steps_per_s"] == 0.0


def test_status_json_prints_one_object(r, run_id, redis_url, redis_server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(PASSWORD_ENV, redis_server.password)  # config.json holds no password
    fill(r, run_id, finished=True)
    run_dir = tmp_path / run_id
    run_dir.mkdir()
    cfg = legacy_config(run_id=run_id, log_path=str(tmp_path), redis={"url": redis_url})
    (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json")))
    assert cli.run(["status", str(run_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["run_id"] == run_id and out["steps"] == 1 and out["published_version"] == 0
    for key in ("backlog", "rates", "live_workers", "worker_versions", "groups", "trainer_pending"):
        assert key in out
    assert out["rates"]["samples_per_s"] == 0.2


def test_status_folds_from_the_snapshot_plus_the_events_after_it(r, run_id, tmp_path, monkeypatch):
    """``status`` reads incrementally (docs/design.md §15.47 Processes start from the checkpoint's
    fold): the newest checkpoint's fold snapshot plus the events after its cursor. With every
    event before the cursor deleted it reports what the full fold reports, and it never asks for an
    event before the cursor."""
    from rlstream.core import fold_snapshot
    from rlstream.core.run_state import RunState

    fill(r, run_id, finished=False)
    state, commit_id = RunState(), None
    for event_id, msg in bus.iter_all_events(r, run_id):
        state.apply(msg)
        if isinstance(msg, StepCommitted):
            commit_id = event_id
    step_dir = tmp_path / "checkpoints" / "step-1"
    step_dir.mkdir(parents=True)
    (step_dir / fold_snapshot.FOLD_FILE).write_text(
        fold_snapshot.dump(state, cursor=commit_id, commit_id=commit_id, step=1, metrics_bytes=0))
    t0 = 1_700_000_000_000  # after the snapshot: row 4 sampled, row 5 trained, the run finished
    add_at(r, run_id, t0 + 150_500, GroupSampled(group_id=group_id_for(0, 4, 0), samples=4, tokens=40))
    add_at(r, run_id, t0 + 150_600, StepCommitted(step=2, version=2, entry_ids=[], sample_ids=[],
                                                  group_ids=[group_id_for(0, 5, 0)]))
    add_at(r, run_id, t0 + 151_000, RunFinished(reason="max_steps", step=2, version=2))
    cfg = legacy_config(run_id=run_id, prompt_groups_per_step=1, completions_per_prompt=4)
    full = collect_status(cfg, r)  # no run directory: the whole stream

    before_cursor = [i for i, _ in r.xrange(keys.events(run_id), max=f"({commit_id}")]
    r.xdel(keys.events(run_id), *before_cursor)
    reads: list[str] = []
    real_read = bus.read_events
    monkeypatch.setattr(bus, "read_events", lambda r_, rid, after="0-0", **kw: (reads.append(after),
                                                                                real_read(r_, rid, after, **kw))[1])
    incremental = collect_status(cfg, r, tmp_path)
    assert reads and reads[0] == commit_id, reads  # from the snapshot's cursor on, never from 0-0
    for key in ("state", "steps", "groups", "backlog", "published_version", "last_reward"):  # (rates: the
        # window's events, some of which were deleted here)
        assert incremental[key] == full[key], key
    assert incremental["steps"] == 2 and incremental["groups"]["trained"] == 2
    assert incremental["backlog"]["unsampled_groups"] == 0  # row 4 was sampled after the snapshot
