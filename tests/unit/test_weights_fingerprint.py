"""``weights.weights_fingerprint``: what a LoRA checkpoint records of its base (docs/design.md
§15.95 A LoRA checkpoint names the base it was trained on). It must tell other weights of the
same shapes apart, change with one tensor's values, ignore where the directory is, and read a
bounded number of bytes whatever the model's size."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlstream.builtin.tiny_model import save_tiny_model
from rlstream.core import weights


def test_same_weights_anywhere_same_fingerprint_other_weights_another(tmp_path: Path):
    a, b = save_tiny_model(tmp_path / "a", seed=0), save_tiny_model(tmp_path / "b", seed=1)
    moved = Path(shutil.copytree(a, tmp_path / "elsewhere" / "a"))
    (moved / "notes.txt").write_text("not a weight file")
    assert weights.weights_fingerprint(moved) == weights.weights_fingerprint(a)
    assert weights.weights_fingerprint(b) != weights.weights_fingerprint(a)


@pytest.mark.parametrize("which", ["first", "last"])
def test_one_tensor_nudged_changes_it(tmp_path: Path, which):
    base = save_tiny_model(tmp_path / "base", seed=0)
    file = base / "model.safetensors"
    before = weights.weights_fingerprint(base)
    tensors = load_file(file)
    name = sorted(tensors)[0 if which == "first" else -1]
    tensors[name] = tensors[name] + 1e-3  # a fine-tune's size of change, in one tensor
    save_file(tensors, file, metadata={"format": "pt"})
    assert weights.weights_fingerprint(base) != before


def test_a_large_file_is_sampled_not_read(tmp_path: Path, monkeypatch):
    tensors = {f"layer{i}.weight": torch.randn(512, 512) for i in range(16)}  # 16 MiB
    save_file(tensors, tmp_path / "model.safetensors")
    torch.save({"w": torch.randn(1024, 1024)}, tmp_path / "pytorch_model.bin")  # 4 MiB, not safetensors
    read = []
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        f = real_open(self, *args, **kwargs)
        real_read = f.read
        f.read = lambda n=-1: read.append(len(chunk := real_read(n))) or chunk
        return f

    monkeypatch.setattr(Path, "open", counting_open)
    fingerprint = weights.weights_fingerprint(tmp_path)
    assert 0 < sum(read) < 128 * 1024  # of 20 MiB
    assert fingerprint == weights.weights_fingerprint(tmp_path)


def test_no_weight_file_is_an_error(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no weight file"):
        weights.weights_fingerprint(tmp_path)
