"""rlstream.trainer.checkpoint / trainer.resume: which checkpoint a resume may use, and RNG isolation."""
from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict
from pathlib import Path

import torch

from rlstream.core import weights
from rlstream.trainer.checkpoint import (
    CheckpointState,
    checkpoint_dir,
    complete_checkpoints,
    holds_commit,
    load_checkpoint,
    read_state,
    rng_untouched,
    save_checkpoint,
)
from rlstream.trainer.resume import loss_matches, usable_checkpoint


def fake_checkpoint(run_dir: Path, step: int, cursor: str) -> Path:
    """A sealed checkpoint directory with only its state.json (enough for choosing one)."""
    tmp = run_dir / "checkpoints" / f".tmp-step-{step}"
    tmp.mkdir(parents=True)
    (tmp / "state.json").write_text(json.dumps(asdict(CheckpointState(step, step, cursor, 0))))
    weights.seal(tmp, checkpoint_dir(run_dir, step), step)
    return checkpoint_dir(run_dir, step)


def test_complete_checkpoints_newest_first_skipping_corrupt(tmp_path, caplog):
    for step in (2, 10, 5):
        fake_checkpoint(tmp_path, step, f"{step}-0")
    (checkpoint_dir(tmp_path, 10) / "state.json").write_text("{}")  # corrupt after sealing
    (tmp_path / "checkpoints" / "step-11").mkdir()  # incomplete: no manifest
    with caplog.at_level(logging.WARNING):
        assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-5", "step-2"]
    assert "step-11" in caplog.text and "step-10" in caplog.text
    assert next(complete_checkpoints(tmp_path)) == checkpoint_dir(tmp_path, 5)
    assert read_state(checkpoint_dir(tmp_path, 5)).events_cursor == "5-0"


def test_usable_checkpoint_is_the_newest_the_events_agree_with(tmp_path, caplog):
    fake_checkpoint(tmp_path, 4, "40-0")
    fake_checkpoint(tmp_path, 8, "80-0")
    fake_checkpoint(tmp_path, 12, "120-0")
    commits = {step: f"{step * 10}-0" for step in range(1, 12)}  # the OS crash lost step 12's commit
    commits[8] = "99-0"  # and step 8 was committed again since, with other samples
    with caplog.at_level(logging.WARNING):
        path, state = usable_checkpoint(tmp_path, commits)
    assert path == checkpoint_dir(tmp_path, 4) and state.step == 4
    assert "step-12: the events stream records only 11 step(s)" in caplog.text
    assert "step-8: step 8 is now event 99-0, not the saved 80-0" in caplog.text
    assert usable_checkpoint(tmp_path, {}) is None
    assert usable_checkpoint(tmp_path / "nothing", {}) is None


def test_holds_commit(tmp_path):
    path = fake_checkpoint(tmp_path, 3, "30-0")
    assert holds_commit(path, "30-0")
    assert not holds_commit(path, "31-0")
    assert not holds_commit(tmp_path / "missing", "30-0")


def test_rng_untouched_leaves_torch_and_python_streams_where_they_were():
    torch.manual_seed(7)
    random.seed(7)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(7)
    random.seed(7)
    with rng_untouched(torch.device("cpu")):
        torch.rand(100)
        random.random()
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_loss_matches_is_relative_with_a_floor():
    assert loss_matches(1.0, 1.0005)
    assert not loss_matches(1.0, 1.002)
    assert loss_matches(0.0, 1e-7)
    assert not loss_matches(0.01, -0.01)


def test_verify_checkpoint_names_what_to_fix(tmp_path):
    import pytest

    from rlstream.core.errors import ConfigError
    from rlstream.trainer.checkpoint import verify_checkpoint

    good = fake_checkpoint(tmp_path, 3, "3-0")
    assert verify_checkpoint(good) == good
    (good / "state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"init_from_checkpoint .*step-3' is not a complete checkpoint .*sha256"):
        verify_checkpoint(good)
    with pytest.raises(ConfigError, match="checkpoints/step-<N> directory"):
        verify_checkpoint(tmp_path / "nowhere")


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    import pytest
    from safetensors.torch import save_file

    from rlstream.builtin.tiny_model import build_model
    from rlstream.core.errors import RlstreamError
    from rlstream.trainer.checkpoint import load_checkpoint

    model = build_model()
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(RlstreamError, match="does not fit the model .*unexpected \\['other.weight'\\]"):
        load_checkpoint(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), torch.device("cpu"))


def test_a_checkpoint_of_an_unfused_adamw_resumes_with_this_device_s_kernel(tmp_path):
    """docs/design.md §15.96 AdamW runs fused where the device has the kernel: a checkpoint's param groups
    (``fused: None`` in one written before) do not choose the kernel; each step counter goes where
    the chosen kernel keeps it, and the update after the load is the one the moments hold."""
    from factories import legacy_config

    from rlstream.builtin.tiny_model import build_model, build_tokenizer
    from rlstream.trainer.optimize import make_optimizer

    model = build_model(0)
    old = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)  # as before
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.1)
    old.step()
    path = save_checkpoint(tmp_path, CheckpointState(1, 1, "1-0", 0), model, build_tokenizer(), old)
    fresh = build_model(1)
    optimizer = make_optimizer(fresh, legacy_config(learning_rate=1e-3))
    load_checkpoint(path, fresh, optimizer, torch.device("cpu"))
    assert all(group["fused"] is True for group in optimizer.param_groups)
    steps = [optimizer.state[p]["step"] for p in fresh.parameters()]
    assert all(float(s) == 1.0 and s.device == p.device for s, p in zip(steps, fresh.parameters()))
    for p in fresh.parameters():
        p.grad = torch.full_like(p, 0.1)
    optimizer.step()  # the fused kernel, on the loaded moments
    assert all(float(optimizer.state[p]["step"]) == 2.0 for p in fresh.parameters())
