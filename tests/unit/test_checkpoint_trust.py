"""Checkpoints are loaded with ``torch.load(weights_only=True)``: a real train state
(AdamW state, torch RNG ByteTensor, ``random.getstate()`` tuple) round-trips, and a
pickle that would run code is refused before it runs (Reliability II, item 7)."""
from __future__ import annotations

import builtins
import json
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from rlstream.builtin.tiny_model import save_tiny_model
from rlstream.core import weights
from rlstream.core.errors import RlstreamError
from rlstream.sampling.torch_setup import load_model_and_tokenizer
from rlstream.trainer.checkpoint import CheckpointState, load_checkpoint, save_checkpoint

CPU = torch.device("cpu")


def model_and_optimizer(tmp_path: Path):
    model, tokenizer = load_model_and_tokenizer(str(save_tiny_model(tmp_path / "base")), CPU)
    return model, tokenizer, torch.optim.AdamW(model.parameters(), lr=1e-3)


def test_a_real_checkpoint_round_trips_under_weights_only(tmp_path):
    model, tokenizer, optimizer = model_and_optimizer(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # the optimizer now has per-parameter state (step, exp_avg, exp_avg_sq)
    random.seed(5)
    torch.manual_seed(7)
    path = save_checkpoint(tmp_path / "run", CheckpointState(1, 1, "1-0", 0), model, tokenizer, optimizer)
    expected_python, expected_torch = random.random(), torch.rand(3)
    expected_state = optimizer.state_dict()

    random.seed(99)
    torch.manual_seed(99)
    fresh, _, fresh_optimizer = model_and_optimizer(tmp_path)
    assert load_checkpoint(path, fresh, fresh_optimizer, CPU) == CheckpointState(1, 1, "1-0", 0)
    assert random.random() == expected_python
    assert torch.equal(torch.rand(3), expected_torch)
    loaded = fresh_optimizer.state_dict()
    assert loaded["param_groups"] == expected_state["param_groups"]
    for key, state in expected_state["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded["state"][key][name], value), (key, name)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)


class RunsCode:
    """Unpickling this calls ``open(marker, "w")``: stands for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    model, tokenizer, optimizer = model_and_optimizer(tmp_path)
    marker = tmp_path / "pwned"
    tmp = tmp_path / "ckpt" / ".tmp-step-1"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": RunsCode(marker), "rng": {}}, tmp / "train_state.pt")
    (tmp / "state.json").write_text(json.dumps(asdict(CheckpointState(1, 1, "1-0", 0))))
    weights.seal(tmp, tmp_path / "ckpt" / "step-1", 1)  # sealing proves nothing: anyone can seal

    with pytest.raises(RlstreamError, match="not loaded"):
        load_checkpoint(tmp_path / "ckpt" / "step-1", model, optimizer, CPU)
    assert not marker.exists(), "the checkpoint's pickle ran code"
