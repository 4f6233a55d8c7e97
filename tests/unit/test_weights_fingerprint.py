"""``weights.weights_fingerprint``: what a LoRA checkpoint records of its base (docs/design.md
§15.95 A LoRA checkpoint names the base it was trained on). It must tell other weights of the
same shapes apart, change with one tensor's values, ignore where the directory is, and read a
bounded number of bytes whatever the model's size."""
from __future__ import annotations

import json
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
    with pytest.raises(ValueError, match="lacks the weight files from_pretrained would load"):
        weights.weights_fingerprint(tmp_path)


def test_only_the_files_from_pretrained_loads_count(tmp_path: Path):
    """An HF Trainer checkpoint used as a base holds an optimizer and its arguments beside the
    weights: adding or deleting them is not another base."""
    base = save_tiny_model(tmp_path / "base", seed=0)
    before = weights.weights_fingerprint(base)
    torch.save({"state": torch.randn(64)}, base / "optimizer.pt")
    (base / "training_args.bin").write_bytes(b"\x00" * 100)
    (base / "consolidated.safetensors").write_bytes(b"\xff" * 7)  # not loaded, not even valid
    assert weights.weights_fingerprint(base) == before


def test_a_sharded_base_is_the_files_its_index_maps(tmp_path: Path):
    tensors = {f"layer{i}.weight": torch.randn(8, 8) for i in range(4)}
    (tmp_path / "sub").mkdir()
    first, second = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "sub" / "model-00002-of-00002.safetensors"
    save_file({k: tensors[k] for k in ("layer0.weight", "layer1.weight")}, first)
    save_file({k: tensors[k] for k in ("layer2.weight", "layer3.weight")}, second)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in ("layer0.weight", "layer1.weight")}
    weight_map |= {k: "sub/model-00002-of-00002.safetensors" for k in ("layer2.weight", "layer3.weight")}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    before = weights.weights_fingerprint(tmp_path)
    save_file({"layer2.weight": tensors["layer2.weight"] + 1e-3, "layer3.weight": tensors["layer3.weight"]}, second)
    assert weights.weights_fingerprint(tmp_path) != before  # a shard in a subfolder, as the index names it
    weight_map["layer3.weight"] = "../elsewhere/model-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="outside the model directory"):  # an index is data, not a path to follow
        weights.weights_fingerprint(tmp_path)
    weight_map["layer3.weight"] = "sub/model-00002-of-00002.safetensors"
    index.write_text(json.dumps({"weight_map": weight_map}))
    second.unlink()
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        weights.weights_fingerprint(tmp_path)


def test_the_files_are_the_ones_from_pretrained_prefers(tmp_path: Path):
    """A model saved sharded, then unsharded into the same directory, leaves the old index
    behind; from_pretrained loads model.safetensors (transformers 5 prefers it to the index),
    and so does the fingerprint."""
    base = save_tiny_model(tmp_path / "base", seed=0)
    before = weights.weights_fingerprint(base)
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone-00001.safetensors"}}))
    assert weights.weights_fingerprint(base) == before
    assert weights.loaded_weight_files(base) == [base / "model.safetensors"]
    config = json.loads((base / "config.json").read_text())
    shutil.copy(base / "model.safetensors", base / "other.safetensors")
    (base / "config.json").write_text(json.dumps(config | {"transformers_weights": "other.safetensors"}))
    assert weights.loaded_weight_files(base) == [base / "other.safetensors"]  # the config's choice first


@pytest.mark.parametrize("header", [
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [-5000, 4]}}',
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1000000000000000000000000000000]}}',
    b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [true, 4]}}',
    b"[" * 100_000 + b"]" * 100_000,  # deeper than json's recursion
    b'{"w": "not a tensor"}',
    b"\xff\xfe not utf-8",
])
def test_an_odd_safetensors_file_is_sampled_as_plain_bytes(tmp_path: Path, header: bytes):
    """A file the fingerprint cannot read as safetensors still gets one (a clean result, never
    an exception), from its bytes: from_pretrained will say what is wrong with it."""
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\x01" * 64)
    first = weights.weights_fingerprint(tmp_path)
    assert first == weights.weights_fingerprint(tmp_path) and len(first) == 64


def test_a_header_size_past_the_file_is_sampled_as_plain_bytes(tmp_path: Path):
    (tmp_path / "model.safetensors").write_bytes((10 ** 12).to_bytes(8, "little") + b"{}")
    assert len(weights.weights_fingerprint(tmp_path)) == 64
