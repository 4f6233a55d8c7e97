"""LoRA end to end (docs/design.md §15.38 LoRA through peft, merged when published): the
built-in task trained with ``lora_rank > 0`` through real ``rlstream up`` processes learns
(reward rise >= 0.3), its trainer SIGKILLed mid-run resumes from an adapter checkpoint
plus replay, the workers load the merged weights every step, and the run leaves plain HF
directories (weights, export) and adapter checkpoints."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fault_harness import assert_audit_clean, assert_steps_exactly, assert_summary, running_up

from rlstream.core.metrics import read_metrics

pytestmark = pytest.mark.e2e
STEPS = 100
# Measured here (2 cores, 2026-11-29): rank 16 at lr 5e-3 goes 0.12 -> ~0.9 in 100 steps of the
# built-in run; 1e-2 and above learned slowly or collapsed. kl_beta > 0 exercises the reference
# that is the base with the adapters disabled.
LORA = ["--set", "lora_rank=16", "--set", "learning_rate=5e-3", "--set", "kl_beta=0.001",
        "--set", f"max_steps={STEPS}", "--set", "dcp_save_interval=20", "--set", 'output_model_id="lora-merged"']


def test_lora_learns_the_builtin_task_and_resumes_after_a_trainer_kill(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "lora"
    with running_up(tmp_path, "lora", *LORA, env={"RLSTREAM_FAULT": "after_commit:50"}) as up:
        assert up.wait_exit(timeout=400) == 0, up.logs()
        assert_summary(up, STEPS)
        trainer_log = (run_dir / "logs" / "trainer.log").read_text()
        assert "failpoint after_commit:50: SIGKILL" in trainer_log, up.logs()
        assert re.search(r"resuming from \S*step-40 \(step 40\)", trainer_log), up.logs()
        assert "replayed to step 50" in trainer_log and "replay of step" not in trainer_log, up.logs()
    assert_steps_exactly(run_dir, STEPS)
    assert_audit_clean(run_dir, tmp_path)

    rewards = [r["rollout/reward_mean"] for r in read_metrics(run_dir / "metrics.jsonl")]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last - first >= 0.3, (first, last)

    # Checkpoints hold the adapter (peft's format) and no base weights.
    final = run_dir / "checkpoints" / f"step-{STEPS}"
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 16
    assert not list(final.glob("model*.safetensors"))
    # What workers loaded and what was exported: plain, merged HF directories.
    from transformers import AutoModelForCausalLM

    for directory in (run_dir / "weights" / f"v{STEPS}", run_dir / "models" / "lora-merged"):
        assert not (directory / "adapter_config.json").exists()
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert not any("lora" in name for name in model.state_dict())
