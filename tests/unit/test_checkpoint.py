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
    read_state,
    rng_untouched,
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
