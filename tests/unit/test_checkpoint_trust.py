"""Checkpoints are loaded as plain data (``torch.load(weights_only=True)``, DCP's metadata
and objects through an allow-list): a real train state (AdamW state, torch RNG ByteTensor,
``random.getstate()`` tuple) round-trips, and a pickle that would run code is refused before it
runs (Reliability II, item 7), in ``train_state.pt`` (the format before dcp/) as in ``dcp/``."""
from __future__ import annotations

import builtins
import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from rlstream.builtin.tiny_model import save_tiny_model
from rlstream.core import weights
from rlstream.core.errors import RlstreamError
from rlstream.sampling.torch_setup import load_model_and_tokenizer
from rlstream.trainer.checkpoint import DCP_DIR, CheckpointState, load_checkpoint, save_checkpoint, verify_checkpoint
from rlstream.trainer.policy_model import write_model_dir

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


def legacy_checkpoint(run_dir: Path, state: CheckpointState, model, tokenizer, optimizer) -> Path:
    """A checkpoint as rlstream wrote it before dcp/ (trainer/checkpoint.py up to 3c673dd, its
    save_checkpoint line for line): HF weights, train_state.pt (optimizer by parameter index,
    RNG), state.json, sealed."""
    def train_state(tmp: Path) -> None:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "train_state.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)))

    final = run_dir / "checkpoints" / f"step-{state.step}"
    write_model_dir(final, model, tokenizer, version=state.version, extra_files=train_state)
    return final


def test_a_checkpoint_in_the_format_before_dcp_still_loads(tmp_path):
    model, tokenizer, optimizer = model_and_optimizer(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    torch.manual_seed(3)
    path = legacy_checkpoint(tmp_path / "run", CheckpointState(1, 1, "1-0", 0), model, tokenizer, optimizer)
    assert not (path / DCP_DIR).exists() and (path / "train_state.pt").is_file()
    expected = torch.rand(3)
    fresh, _, fresh_optimizer = model_and_optimizer(tmp_path)
    assert load_checkpoint(verify_checkpoint(path), fresh, fresh_optimizer, CPU) == CheckpointState(1, 1, "1-0", 0)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    for key, state in optimizer.state_dict()["state"].items():
        assert all(torch.equal(v, fresh_optimizer.state_dict()["state"][key][k]) for k, v in state.items())


def saved_dcp(tmp_path: Path) -> tuple[Path, object, object]:
    model, tokenizer, optimizer = model_and_optimizer(tmp_path)
    return save_checkpoint(tmp_path / "run", CheckpointState(1, 1, "1-0", 0), model, tokenizer, optimizer), model, \
        optimizer


def reseal(path: Path) -> None:
    """Seal ``path`` again after an edit: anyone can seal, so sealing proves nothing."""
    tmp = path.with_name(".tmp-edit")
    path.rename(tmp)
    (tmp / weights.MANIFEST).unlink()
    weights.seal(tmp, path, 1)


def test_a_dcp_metadata_pickle_that_runs_code_is_refused(tmp_path):
    import pickle

    path, model, optimizer = saved_dcp(tmp_path)
    marker = tmp_path / "pwned"
    (path / DCP_DIR / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    reseal(path)
    with pytest.raises(RlstreamError, match="not loaded"):
        load_checkpoint(path, model, optimizer, CPU)
    assert not marker.exists(), "the checkpoint's metadata ran code"


def test_a_dcp_object_that_runs_code_is_refused(tmp_path):
    """The optimizer's hyperparameters are DCP byte items, which its default planner unpickles
    with weights_only=False."""
    import torch.distributed.checkpoint as dcp

    from rlstream.trainer.checkpoint import train_state

    path, model, optimizer = saved_dcp(tmp_path)
    marker = tmp_path / "pwned"
    state = train_state(model, optimizer)
    state["optimizer"]["param_groups"][0]["lr"] = RunsCode(marker)
    shutil.rmtree(path / DCP_DIR)
    dcp.save(state, checkpoint_id=path / DCP_DIR, no_dist=True)
    reseal(path)
    with pytest.raises(RlstreamError, match="not loaded"):
        load_checkpoint(path, model, optimizer, CPU)
    assert not marker.exists(), "the checkpoint's optimizer state ran code"


def test_a_dcp_checkpoint_of_another_model_is_refused(tmp_path):
    from rlstream.builtin.tiny_model import build_model

    path, _, _ = saved_dcp(tmp_path)
    other = build_model(0, name="builtin:tiny-h64")  # another shape of attention, an lm_head of its own
    with pytest.raises(RlstreamError, match="does not fit the model and optimizer"):
        load_checkpoint(path, other, torch.optim.AdamW(other.parameters()), CPU)
