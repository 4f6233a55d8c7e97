"""``rlstream replay``: a fresh model trained on a recorded run's committed samples. With the
source's own config it reproduces the source's training step for step, also in micro-batches
(docs/design.md §15.39 Micro-batches sum to the whole-batch step); with another loss, or
with LoRA, it trains on the same samples; the source run is only read."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import factories
import pytest

from rlstream.core import keys
from rlstream.core.credentials import PASSWORD_ENV
from rlstream.core.metrics import read_metrics
from rlstream.ops.status import opened_run

pytestmark = pytest.mark.e2e
CONFIG = Path(__file__).resolve().parents[2] / "examples" / "builtin" / "config.toml"
SMALL = ["--set", "max_steps=5", "--set", "prompt_groups_per_step=8", "--set", "completions_per_prompt=4",
         "--set", "workers.count=1"]


rlstream = partial(factories.rlstream, check=True)


def events_length(run_dir: Path) -> int:
    with opened_run(str(run_dir), "runs") as (_, cfg, r):
        return r.xlen(keys.events(cfg.run_id))


def test_replay_reproduces_the_source_and_trains_other_losses_on_its_samples(tmp_path: Path, builtin_run,
                                                                              monkeypatch) -> None:
    # The source: the session's shared built-in run "src" (tests/e2e/conftest.py: max_steps=5, P = 8, G = 4, as
    # SMALL), on the session's redis-server, whose password the replays and events_length read from the env.
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/src").symlink_to(builtin_run.run_dir)
    monkeypatch.setenv(PASSWORD_ENV, builtin_run.password)
    source = read_metrics(tmp_path / "runs/src/metrics.jsonl")
    before = events_length(tmp_path / "runs/src")

    out = rlstream("replay", "src", str(CONFIG), "--run-id", "same", *SMALL, "--set", 'output_model_id="m"',
                   cwd=tmp_path)
    assert "replayed 5 steps of run src" in out.stdout
    same = read_metrics(tmp_path / "runs/same/metrics.jsonl")
    assert [m["replay/source_step"] for m in same] == [1, 2, 3, 4, 5]
    for a, b in zip(same, source):  # same init, same samples, same order, same LR: the same training
        assert a["rollout/reward_mean"] == b["rollout/reward_mean"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5, abs=1e-7)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
    run_dir = tmp_path / "runs/same"
    assert json.loads((run_dir / "replay.json").read_text()) == {"source_run": "src", "steps": 5}
    assert (run_dir / "weights/v5/manifest.json").is_file() and (run_dir / "checkpoints/step-5").is_dir()
    assert (run_dir / "models/m/config.json").is_file()

    # The same steps accumulated over micro-batches of two 5-token samples (10 padded tokens <= 12).
    rlstream("replay", "src", str(CONFIG), "--run-id", "micro", *SMALL, "--set", "trainer.micro_batch_tokens=12",
             cwd=tmp_path)
    micro = read_metrics(tmp_path / "runs/micro/metrics.jsonl")
    assert len(micro) == 5 and all(m["train/micro_batches"] == 16 for m in micro)  # 32 samples, 2 per forward
    # The same samples, in the same steps; the step's numbers from the same state are unit-tested
    # (tests/unit/test_microbatch.py, each step from the same state on every CPU ISA, docs/design.md §13 Tests).
    assert [m["replay/source_step"] for m in micro] == [1, 2, 3, 4, 5]
    assert [m["rollout/reward_mean"] for m in micro] == [m["rollout/reward_mean"] for m in source]
    assert [m["train/active_tokens"] for m in micro] == [m["train/active_tokens"] for m in source]
    # Step 1 starts from the same weights: only the summation order differs, so the loss, a mean over
    # the n active tokens of terms of a few units (|advantage| <= 2, ratio 1), may move by 2 n U x 4.
    # Later steps start from weights that differ at float rounding, which AdamW amplifies where a
    # gradient is near its eps (1e-8; GRPO's gradients cancel within groups): a trajectory, not compared.
    n, u = micro[0]["train/active_tokens"], 2.0 ** -24
    assert micro[0]["train/loss"] == pytest.approx(source[0]["train/loss"], rel=0, abs=2 * n * u * 4)
    assert micro[0]["train/grad_norm"] == pytest.approx(source[0]["train/grad_norm"], rel=2 * n * u)

    rlstream("replay", "runs/src", str(CONFIG), "--run-id", "cispo", *SMALL, "--set", 'policy_loss="cispo"',
             "--set", "max_steps=3", cwd=tmp_path)
    cispo = read_metrics(tmp_path / "runs/cispo/metrics.jsonl")
    assert [m["rollout/reward_mean"] for m in cispo] == [m["rollout/reward_mean"] for m in source[:3]]
    # another loss on the same samples (a step whose groups all had equal rewards has loss 0 under both)
    assert any(c["train/loss"] != pytest.approx(s["train/loss"], rel=1e-3) for c, s in zip(cispo, source))
    # LoRA on the same samples (docs/design.md §15.38 LoRA through peft, merged when published): adapter
    # checkpoints, merged weights.
    rlstream("replay", "src", str(CONFIG), "--run-id", "lora", *SMALL, "--set", "lora_rank=8", "--set", "max_steps=3",
             cwd=tmp_path)
    lora = read_metrics(tmp_path / "runs/lora/metrics.jsonl")
    assert [m["rollout/reward_mean"] for m in lora] == [m["rollout/reward_mean"] for m in source[:3]]
    assert (tmp_path / "runs/lora/checkpoints/step-3/adapter_config.json").is_file()
    assert not (tmp_path / "runs/lora/weights/v3/adapter_config.json").exists()
    assert events_length(tmp_path / "runs/src") == before  # the source was only read


def test_replay_at_two_trainer_ranks_reproduces_the_source(tmp_path: Path, builtin_run, monkeypatch) -> None:
    """``rlstream replay --set trainer.nproc_per_node=2``: torchrun's two ranks, rank 0 reading the
    source's steps and sending each batch to the other (docs/design.md §15.82 Rank 0 speaks for the
    trainer's ranks), one replay run id chosen before the ranks start."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs/src").symlink_to(builtin_run.run_dir)
    monkeypatch.setenv(PASSWORD_ENV, builtin_run.password)
    source = read_metrics(tmp_path / "runs/src/metrics.jsonl")
    out = rlstream("replay", "src", str(CONFIG), *SMALL, "--set", "trainer.nproc_per_node=2", cwd=tmp_path,
                   timeout=300)
    replayed = [line for line in out.stdout.splitlines() if line.startswith("replayed 5 steps of run src into ")]
    assert len(replayed) == 1, out.stdout + out.stderr  # rank 0 alone reports
    run_dir = tmp_path / replayed[0].split(" into ")[1]
    two = read_metrics(run_dir / "metrics.jsonl")
    assert [m["replay/source_step"] for m in two] == [1, 2, 3, 4, 5]
    assert [m["rollout/reward_mean"] for m in two] == [m["rollout/reward_mean"] for m in source]
    assert [m["train/active_tokens"] for m in two] == [m["train/active_tokens"] for m in source]  # global counts
    # Step 1 from the same weights, its rows split over two ranks: only the summation order differs (the
    # bound of the micro-batch replay above); later steps are a trajectory, not compared.
    n, u = two[0]["train/active_tokens"], 2.0 ** -24
    assert two[0]["train/loss"] == pytest.approx(source[0]["train/loss"], rel=0, abs=2 * n * u * 4)
    assert two[0]["train/grad_norm"] == pytest.approx(source[0]["train/grad_norm"], rel=2 * n * u)
    assert (run_dir / "weights/v5/manifest.json").is_file()
    assert {p.name for p in (run_dir / "checkpoints/step-5/rng").iterdir()} == {"rank-0.pt", "rank-1.pt"}
