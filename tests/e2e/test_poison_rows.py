"""End to end: bad rows cost their groups, not the run (docs/design.md §15.31 The circuit
breaker judges rows, not draws). A real ``rlstream up`` on the built-in model with a
reward_fn that raises for one row and returns NaN for another, a prompt too long for
``max_seq_len`` and a prompt with a token outside the vocabulary: the run finishes, each
of those groups is rejected with why, and ``rlstream audit`` shows the reasons. A reward_fn
that fails on every row still stops the run, naming its error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import rlstream

from rlstream.builtin.task import builtin_rows

pytestmark = pytest.mark.e2e

REWARD_MODULE = '''
import math

from rlstream.builtin.rewards import exact_match


def poisoned(completion_text, row):
    if row.get("poison") == "raise":
        raise ValueError("poison row: this reward_fn cannot score it")
    if row.get("poison") == "nan":
        return math.nan
    return exact_match(completion_text, row)


def broken(completion_text, row):
    raise ConnectionError("the scoring service is down")
'''

CONFIG = '''
log_path = "runs"
base_model = "builtin:tiny"
dataset = "{dataset}"
reward_fn = "poison_reward:{reward}"
shuffle = false
completions_per_prompt = 4
prompt_groups_per_step = 4
max_completion_tokens = 1
max_seq_len = 16
kl_beta = 0.0
max_rows = 10000
learning_rate = 2e-3
max_steps = 10
max_head_offpolicy_versions = 1  # the default was 1 when this test was measured (now 0)

[workers]
count = 1
'''


def write_run(tmp_path: Path, rows: list[dict], reward: str) -> Path:
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "poison_reward.py").write_text(REWARD_MODULE)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(dataset=dataset, reward=reward))
    return config


def test_poison_rows_are_rejected_with_their_reasons_and_the_run_finishes(tmp_path: Path) -> None:
    good = list(builtin_rows(40, seed=0))
    bad = [
        {**good[0], "poison": "raise"},
        {**good[1], "poison": "nan"},
        {"prompt": "1+2=" * 5, "answer": "3"},  # 20 tokens: no room under max_seq_len 16
        {"prompt_token_ids": [1, 2, 999]},  # the tiny model's vocabulary has 16 ids
    ]
    config = write_run(tmp_path, bad + good, "poisoned")  # unshuffled: the bad rows go first

    up = rlstream("up", str(config), "--run-id", "poison", cwd=tmp_path, timeout=300)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert up.stdout.strip().splitlines()[-1].startswith("summary: steps=10"), up.stdout[-2000:]

    audit = rlstream("audit", str(tmp_path / "runs" / "poison"), cwd=tmp_path, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    reasons = [line for line in audit.stdout.splitlines() if line.startswith("rejected_reason:")]
    expected = ["ValueError: poison row: this reward_fn cannot score it (only 0 of 4 draws",
                "invalid sample: reward must be finite, got nan (only 0 of 4 draws",
                "row 2: prompt of 20 tokens leaves no room under max_seq_len 16",
                "row 3: token id 999 >= vocab size 16"]
    for needle in expected:
        assert any(needle in line for line in reasons), (needle, audit.stdout)
    assert "groups_rejected: 4" in audit.stdout and "groups_trained: 40" in audit.stdout, audit.stdout


def test_a_reward_fn_failing_on_every_row_stops_the_run_naming_its_error(tmp_path: Path) -> None:
    config = write_run(tmp_path, list(builtin_rows(40, seed=0)), "broken")
    up = rlstream("up", str(config), "--run-id", "broken", cwd=tmp_path, timeout=300)
    assert up.returncode == 1, up.stdout[-3000:] + up.stderr[-3000:]
    assert "circuit breaker" in up.stderr and "ConnectionError: the scoring service is down" in up.stderr, up.stderr
