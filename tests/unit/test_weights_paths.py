"""Workers read published weights from their own run directory (``weights/v<N>``), never
from the path a ``WeightsPublished`` event names: whoever can write to Redis must not be
able to point a worker at a directory of their choosing (Reliability II, item 7)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlstream.builtin.tiny_model import save_tiny_model
from rlstream.core import weights
from rlstream.core.messages import WeightsPublished
from rlstream.sampling.local import LocalPolicy

CPU = torch.device("cpu")


def publish(root: Path, version: int, seed: int) -> str:
    """Seal a tiny model (``seed`` picks its weights) as ``root/v<version>``; its digest."""
    model_dir = save_tiny_model(root / f"model-{version}-{seed}", seed=seed)
    digest, _ = weights.seal(model_dir, weights.version_dir(root, version), version)
    return digest


def test_version_dir_takes_only_a_non_negative_int(tmp_path):
    assert weights.version_dir(tmp_path, 3) == tmp_path / "v3"
    for bad in (-1, "../x", True, 1.0):
        with pytest.raises(ValueError):
            weights.version_dir(tmp_path, bad)


def test_local_policy_reads_the_run_dir_and_ignores_the_uri(tmp_path):
    root, elsewhere = tmp_path / "run" / "weights", tmp_path / "attacker"
    digest_v0 = publish(root, 0, seed=0)
    evil_digest = publish(elsewhere, 0, seed=1)

    policy = LocalPolicy(WeightsPublished(version=0, uri=str(elsewhere / "v0"), sha256=digest_v0, bytes=1), CPU, root)
    assert policy.version == 0
    # A digest of the attacker's directory does not match ours: refused, whatever the uri says.
    with pytest.raises(ValueError, match="does not match"):
        LocalPolicy(WeightsPublished(version=0, uri=str(elsewhere / "v0"), sha256=evil_digest, bytes=1), CPU, root)

    digest_v1 = publish(root, 1, seed=2)
    policy.load(WeightsPublished(version=1, uri="/nowhere/v1", sha256=digest_v1, bytes=1))
    assert policy.version == 1
    expected = save_tiny_model(tmp_path / "check", seed=2)
    from safetensors.torch import load_file

    state = {k: v for f in expected.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    name, tensor = next(iter(state.items()))
    assert torch.equal(policy.model.state_dict()[name], tensor)
