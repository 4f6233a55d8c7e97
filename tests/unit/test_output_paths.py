"""output_model_id can only name a directory inside runs/<run>/models/, and sealing a
directory over an existing one never deletes the old one before the new one is in place
(Reliability II, item 1)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from factories import rlstream

from rlstream.core import weights
from rlstream.core.config import load_config
from rlstream.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "builtin" / "config.toml"
ESCAPING = ["..", ".", "../x", "a/../../b", "/abs", "/", "a/b", ".hidden", ".tmp-m", "", "a\\..\\b", "~"]


@pytest.mark.parametrize("value", ESCAPING)
def test_output_model_id_that_leaves_models_dir_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"^config error: output_model_id:"):
        load_config(None, [], environ={"RLSTREAM_OUTPUT_MODEL_ID": value})


@pytest.mark.parametrize("value", ["m", "promoted", "my.model-1_v2", "7", "a..b", "x" * 128])
def test_plain_output_model_ids_are_accepted(value):
    assert load_config(None, [f'output_model_id="{value}"'], environ={}).output_model_id == value


def test_cli_refuses_dot_dot_with_exit_2_before_anything_starts(tmp_path):
    proc = rlstream("up", str(EXAMPLE), "--run-id", "r", "--set", 'output_model_id=".."', cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("rlstream: config error: output_model_id:"), proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/../../b", "/abs", ""])
def test_child_dir_refuses_names_that_leave_the_parent(tmp_path, name):
    with pytest.raises(ValueError, match="not a plain directory name"):
        weights.child_dir(tmp_path / "models", name)
    assert weights.child_dir(tmp_path / "models", "m") == tmp_path / "models" / "m"


def test_export_model_never_touches_the_run_dir_for_dot_dot(tmp_path):
    """Defence in depth behind the config check: export_model itself refuses ``..``."""
    from rlstream.trainer.checkpoint import export_model

    class Saver:
        def parameters(self):  # no tensors: nothing non-finite for the trainer's writer to refuse
            return []

        def save_pretrained(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "x.bin").write_bytes(b"x")

    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    with pytest.raises(ValueError):
        export_model(Saver(), Saver(), tmp_path, "..")
    assert (tmp_path / "checkpoints" / "step-1").is_dir()
    assert export_model(Saver(), Saver(), tmp_path, "m") == tmp_path / "models" / "m"


def sealed(root: Path, name: str, payload: bytes, version: int) -> Path:
    tmp = root / f".tmp-{name}"
    tmp.mkdir(parents=True)
    (tmp / "w.bin").write_bytes(payload)
    weights.seal(tmp, root / name, version)
    return root / name


def test_seal_replaces_an_existing_directory(tmp_path):
    sealed(tmp_path, "v1", b"old", 1)
    final = sealed(tmp_path, "v1", b"new", 1)
    assert (final / "w.bin").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v1"]  # nothing left aside


def test_seal_keeps_the_old_directory_when_the_swap_fails(tmp_path, monkeypatch):
    """A crash or error after the old directory went but before the new one arrived must
    not leave neither: the old one is renamed aside, not deleted, until the swap is done."""
    old = sealed(tmp_path, "v1", b"old", 1)
    tmp = tmp_path / ".tmp-v1"
    tmp.mkdir()
    (tmp / "w.bin").write_bytes(b"new")
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(src) == tmp:
            raise OSError("disk gone")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="disk gone"):
        weights.seal(tmp, old, 1)
    assert (old / "w.bin").read_bytes() == b"old"
    weights.verify(old, weights.directory_digest(old)[0])
