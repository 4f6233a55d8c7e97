"""End to end: the trainer enforces the staleness bound (docs/design.md §5 Versions and the
gate). A straggler row sampled with v0 completes only after the trainer has logged O + 2
steps; the trainer must drop it (an explicit, audited rejection naming the versions), never
train it, so that ``async/version_offset_max`` stays <= O + 1 on every step."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fault_harness import assert_audit_clean, rlstream

from rlstream.core import bus
from rlstream.core.connection import connect
from rlstream.core.embedded_redis import EmbeddedRedis
from rlstream.core.messages import GroupRejected, StepCommitted, group_id_for
from rlstream.core.metrics import read_metrics

pytestmark = pytest.mark.e2e
HERE = Path(__file__).resolve().parent
OFFPOLICY = 1  # max_head_offpolicy_versions: the bound is O + 1 = 2
RUN = "stale"


def write_config(tmp_path: Path) -> Path:
    shutil.copy(HERE / "staleness_rollout.py", tmp_path / "staleness_rollout.py")
    metrics = tmp_path / "runs" / RUN / "metrics.jsonl"
    config = tmp_path / "config.toml"
    config.write_text(f"""
log_path = "runs"
base_model = "builtin:tiny"
max_rows = 2000
shuffle = false
seed = 0
learning_rate = 2e-3
lr_schedule = "constant"
completions_per_prompt = 4
prompt_groups_per_step = 2
max_completion_tokens = 1
max_seq_len = 16
kl_beta = 0.0
max_head_offpolicy_versions = {OFFPOLICY}
max_steps = 6
rollout_fn_factory = "staleness_rollout:make_rollout_fn"

[extras]
metrics = "{metrics}"
marker = "{tmp_path / 'slow-row-started'}"
slow_rows = [0]
steps_ahead = {OFFPOLICY + 2}
wait_s = 40

[workers]
count = 2
""")
    return config


def test_a_straggler_past_the_bound_is_dropped_not_trained(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    proc = rlstream("up", str(config), "--run-id", RUN, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / RUN
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    offsets = [r["async/version_offset_max"] for r in rows]
    assert max(offsets) <= OFFPOLICY + 1, offsets
    assert rows[-1]["async/stale_groups_dropped_total"] >= 1, "no group was dropped as stale: the test proved nothing"
    assert sum(r["async/stale_groups_dropped"] for r in rows) == rows[-1]["async/stale_groups_dropped_total"]

    server = EmbeddedRedis(run_dir / "redis")
    r = connect(server.start())
    try:
        events = [m for _, m in bus.iter_all_events(r, RUN)]
    finally:
        r.close()
        server.stop()
    straggler = group_id_for(0, 0, 0)
    [dropped] = [m for m in events if isinstance(m, GroupRejected) and m.group_id == straggler]
    assert dropped.by == "trainer" and dropped.reason.startswith("stale: sampled with v0, trainer at v"), dropped
    assert "max_head_offpolicy_versions + 1 = 2" in dropped.reason
    assert all(straggler not in m.group_ids for m in events if isinstance(m, StepCommitted))

    audit = assert_audit_clean(run_dir, tmp_path)
    assert "stale: sampled with v0" in audit
