"""Checkpoints and published weights across torch.distributed ranks (docs/design.md §15.80
Checkpoints with torch.distributed.checkpoint): two gloo ranks on CPU, the built-in model
sharded with FSDP2 (``fully_shard`` per decoder layer, then the root).

One test, one group of two ranks (this file run as a script, once per rank): a checkpoint
written at 1 rank loads at 2; a checkpoint written at 2 ranks loads at 2 and, back in the
test's own process without a process group, at 1, with the same weights, AdamW state and
per-rank RNG streams; the weights published from the 2 sharded ranks are the very directory
(sha256) the unsharded model publishes and load in ``from_pretrained``; a save that fails
before its manifest leaves no checkpoint; weights stored in bfloat16 train as float32 masters
made before sharding and are gathered for publishing in bfloat16 (``Precision.sharded``).
A LoRA (peft) policy sharded as the trainer shards it (``ranks.shard``): its checkpoint written at
2 ranks holds the adapters alone (``dcp/`` and peft's adapter files, never the frozen base) and
loads at 2 and at 1 with the same adapter weights and AdamW state; the merged weights it publishes
from 2 ranks are the directory (sha256) the unsharded LoRA policy publishes. Collectives have a
generous timeout: the machine has 2 shared cores."""
from __future__ import annotations

import copy
import datetime
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import torch

from rlstream.builtin.tiny_model import build_model, build_tokenizer
from rlstream.core import weights
from rlstream.core.config import Config
from rlstream.torchrun import end_rank
from rlstream.trainer import lora, sharded
from rlstream.trainer.checkpoint import (
    CheckpointState,
    checkpoint_dir,
    complete_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from rlstream.trainer.optimize import make_optimizer
from rlstream.trainer.precision import prepare
from rlstream.trainer.ranks import Ranks
from rlstream.trainer.ranks import shard as shard_as_trainer
from rlstream.trainer.weight_sync import WeightSync

WORLD = 2
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)
GROUP_TIMEOUT_S = 600


def optimizer_of(model) -> torch.optim.AdamW:
    """The trainer's AdamW (``make_optimizer``: fused on the CPU), so that its state is saved and
    loaded at another number of ranks as a run's is."""
    return make_optimizer(model, Config(learning_rate=1e-2))


def train_step(model, optimizer, seed: int) -> None:
    """One AdamW step on a batch drawn from ``seed`` (the same batch on every rank)."""
    ids = torch.randint(3, 12, (2, 6), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def shard(model) -> None:
    """FSDP2 as the trainer will shard it: each decoder layer, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def lora_model(mesh=None, rank: int = 0):
    """The built-in model with LoRA adapters (the same A on every rank and in the test's process:
    peft draws it from torch's stream), sharded over ``mesh`` as the trainer shards it."""
    torch.manual_seed(11)
    model = lora.wrap(build_model(0), Config(lora_rank=4, lora_target_modules="all-linear"))
    if mesh is not None:
        shard_as_trainer(model, Ranks(rank, WORLD, torch.device("cpu"), mesh))
    return model


def full_states(model, optimizer) -> tuple[dict, dict]:
    """Copies of the full model and optimizer state dicts, by name (a collective when sharded;
    rank 0's are the full ones). Copies: AdamW's ``step`` comes back as the live tensor."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return copy.deepcopy(get_state_dict(model, optimizer, options=options))


def assert_same_states(expected: tuple[dict, dict], got: tuple[dict, dict]) -> None:
    (model_a, optim_a), (model_b, optim_b) = expected, got
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    assert optim_a["state"].keys() == optim_b["state"].keys() and optim_a["state"]
    for name, state in optim_a["state"].items():
        assert state.keys() == optim_b["state"][name].keys() >= {"step", "exp_avg", "exp_avg_sq"}
        for key, value in state.items():
            assert torch.equal(value, optim_b["state"][name][key]), (name, key)
    assert optim_a["param_groups"] == optim_b["param_groups"]


def draws() -> tuple[torch.Tensor, float]:
    return torch.rand(3), random.random()


class Lease:
    def confirm(self) -> None:
        pass


def weight_sync(run_dir: Path) -> tuple[WeightSync, list]:
    """A WeightSync whose announcements are recorded instead of XADDed."""
    sync, announced = WeightSync(None, "t", Lease(), run_dir, keep=10), []
    sync.announce = announced.append
    return sync, announced


def publish(sync: WeightSync, model, version: int) -> None:
    pending = sync.start(model, build_tokenizer(), version)
    pending.committed()
    sync.wait()


def rank_main(rank: int, port: int, work: Path) -> None:
    """One rank of the group (this file run as a script)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    torch.set_num_threads(1)
    try:
        # 1 -> 2: the checkpoint the test's process wrote without a process group
        model = build_model(0)
        shard(model)
        optimizer = optimizer_of(model)
        load_checkpoint(checkpoint_dir(work / "one", 1), model, optimizer, torch.device("cpu"))
        gathered = full_states(model, optimizer)
        expected = torch.load(work / "one-expected.pt", weights_only=True)
        if rank == 0:
            assert_same_states(expected["states"], gathered)
        assert torch.equal(draws()[0], expected["draws"][0])  # rank 1 starts from rank 0's streams (logged)

        # 2 ranks: train, save, publish
        model = build_model(0)
        shard(model)
        optimizer = optimizer_of(model)
        train_step(model, optimizer, seed=1)
        torch.manual_seed(100 + rank)
        random.seed(100 + rank)
        run = work / "two"
        save_checkpoint(run, CheckpointState(1, 1, "1-0", 0), model, build_tokenizer(), optimizer, fold="{}")
        mine = draws()
        states = full_states(model, optimizer)
        sync, announced = weight_sync(run)
        publish(sync, model, 1)  # the first version: written on the step's thread, the template derived
        train_step(model, optimizer, seed=2)
        publish(sync, model, 2)  # from the template: rank 0's writer thread, from the gathered tensors
        after = full_states(model, optimizer)[0]
        sync.close()
        torch.save({"draws": mine}, work / f"two-draws-{rank}.pt")
        if rank == 0:
            assert [w.version for w in announced] == [1, 2]
            torch.save({"states": states, "after": after}, work / "two-expected.pt")
        else:
            assert announced == [] and not (run / "weights" / "v3").exists()

        # 2 -> 2, with each rank's RNG streams
        model = build_model(0)
        shard(model)
        optimizer = optimizer_of(model)
        torch.manual_seed(7)
        load_checkpoint(checkpoint_dir(run, 1), model, optimizer, torch.device("cpu"))
        loaded_draws = draws()
        assert torch.equal(loaded_draws[0], mine[0]) and loaded_draws[1] == mine[1]
        loaded = full_states(model, optimizer)
        if rank == 0:
            assert_same_states(states, loaded)

        # a save that fails on rank 0 before its manifest: the error reaches every rank, nothing is sealed
        real_seal = weights.seal

        def crash(*args, **kwargs):
            raise OSError("disk gone before the manifest")

        weights.seal = crash
        try:
            save_checkpoint(run, CheckpointState(2, 2, "2-0", 0), model, build_tokenizer(), optimizer, fold="{}")
        except Exception as exc:
            assert "disk gone before the manifest" in str(exc), exc
        else:
            raise AssertionError("the failed save returned")
        finally:
            weights.seal = real_seal
        assert [p.name for p in complete_checkpoints(run)] == ["step-1"]
        assert not checkpoint_dir(run, 2).exists() and (run / "checkpoints" / ".tmp-step-2" / "dcp").is_dir()

        # Weights stored in bfloat16: float32 masters made before sharding (the trainer's order), and the
        # published weights cast back once gathered, by name; no reference to the unsharded parameters is kept.
        stored = build_model(0).to(torch.bfloat16)
        original = {k: v.clone() for k, v in stored.state_dict().items()}
        precision = prepare(stored, "float32", torch.device("cpu"), False)
        shard(stored)
        precision = precision.sharded()
        assert precision.masters == [] and {p.dtype for p in stored.parameters()} == {torch.float32}
        with precision.published():
            full = sharded.full_state_dict(stored)
        masters = sharded.full_state_dict(stored)  # outside the block: the float32 masters
        if rank == 0:
            assert {v.dtype for v in full.values()} == {torch.bfloat16}, {v.dtype for v in full.values()}
            assert all(torch.equal(full[k], original[k]) for k in original)
            assert full["lm_head.weight"] is full["model.embed_tokens.weight"]  # still tied: saved once
            assert {v.dtype for v in masters.values()} == {torch.float32}
        sharded.barrier()
        lora_ranks(rank, work)
    finally:
        dist.destroy_process_group()


def lora_ranks(rank: int, work: Path) -> None:
    """The LoRA part of ``rank_main``: 2 ranks train, save, publish twice; a fresh pair loads."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    model = lora_model(mesh, rank)
    optimizer = optimizer_of(model)
    train_step(model, optimizer, seed=1)
    run = work / "lora"
    save_checkpoint(run, CheckpointState(1, 1, "1-0", 0), model, build_tokenizer(), optimizer, fold="{}")
    states = full_states(model, optimizer)
    sync, announced = weight_sync(run)
    publish(sync, model, 1)
    train_step(model, optimizer, seed=2)
    publish(sync, model, 2)
    after = full_states(model, optimizer)[0]
    sync.close()
    if rank == 0:
        assert [w.version for w in announced] == [1, 2]
        torch.save({"states": states, "after": after}, work / "lora-expected.pt")

    model = lora_model(mesh, rank)  # 2 -> 2
    optimizer = optimizer_of(model)
    load_checkpoint(checkpoint_dir(run, 1), model, optimizer, torch.device("cpu"))
    loaded = full_states(model, optimizer)
    if rank == 0:
        assert_same_states(states, loaded)
        trained = [k for k in states[0] if "lora_" in k]
        assert trained and all(not torch.equal(loaded[0][k], lora_model().state_dict()[k]) for k in trained)
    sharded.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def digest(directory: Path) -> str:
    return weights.directory_digest(directory)[0]


def test_checkpoints_and_published_weights_across_ranks(tmp_path):
    cpu = torch.device("cpu")
    # A checkpoint written at 1 rank (no process group): the group loads it at 2.
    model = build_model(0)
    optimizer = optimizer_of(model)
    train_step(model, optimizer, seed=1)
    torch.manual_seed(5)
    random.seed(5)
    save_checkpoint(tmp_path / "one", CheckpointState(1, 1, "1-0", 0), model, build_tokenizer(), optimizer)
    torch.save({"states": full_states(model, optimizer), "draws": draws()}, tmp_path / "one-expected.pt")

    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, __file__, str(rank), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(WORLD)]
    outputs = []
    for proc in ranks:
        try:
            outputs.append(proc.communicate(timeout=GROUP_TIMEOUT_S)[0])
        except subprocess.TimeoutExpired:
            for p in ranks:
                p.kill()
            raise
    for rank, (proc, out) in enumerate(zip(ranks, outputs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{out[-6000:]}"

    # 2 -> 1: the checkpoint written by the two ranks, loaded here without a process group
    expected = torch.load(tmp_path / "two-expected.pt", weights_only=True)
    run = tmp_path / "two"
    model = build_model(0)
    optimizer = optimizer_of(model)
    torch.manual_seed(7)
    load_checkpoint(checkpoint_dir(run, 1), model, optimizer, cpu)
    assert_same_states(expected["states"], full_states(model, optimizer))
    rank0 = torch.load(tmp_path / "two-draws-0.pt", weights_only=True)["draws"]
    got = draws()
    assert torch.equal(got[0], rank0[0]) and got[1] == rank0[1]

    # The published versions are the directories the unsharded model publishes, byte for byte.
    sync, _ = weight_sync(tmp_path / "alone")
    publish(sync, model, 1)
    model.load_state_dict(expected["after"])
    publish(sync, model, 2)
    sync.close()
    for version in (1, 2):
        assert digest(run / "weights" / f"v{version}") == digest(tmp_path / "alone" / "weights" / f"v{version}")
        weights.verify(run / "weights" / f"v{version}", digest(run / "weights" / f"v{version}"))
    from transformers import AutoModelForCausalLM

    published = AutoModelForCausalLM.from_pretrained(run / "weights" / "v2")
    for key, value in published.state_dict().items():
        assert torch.equal(value, expected["after"][key]), key

    # The checkpoint is also an HF directory (float32 masters), what init_from_checkpoint and export read.
    hf = AutoModelForCausalLM.from_pretrained(checkpoint_dir(run, 1))
    assert all(torch.equal(v, expected["states"][0][k]) for k, v in hf.state_dict().items())
    files = set(weights.directory_digest(checkpoint_dir(run, 1))[2])
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rng/rank-0.pt", "rng/rank-1.pt",
            "model.safetensors", "state.json", "fold.json"} <= files

    # LoRA: the checkpoint of the 2 sharded ranks holds the adapters alone, and loads at 1 rank.
    run, expected = tmp_path / "lora", torch.load(tmp_path / "lora-expected.pt", weights_only=True)
    adapters = {k for k, p in lora_model().named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in k for k in adapters)
    files = set(weights.directory_digest(checkpoint_dir(run, 1))[2])
    assert {"adapter_model.safetensors", "adapter_config.json", "dcp/.metadata"} <= files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), files
    from torch.distributed.checkpoint import FileSystemReader

    saved = set(FileSystemReader(checkpoint_dir(run, 1) / "dcp").read_metadata().state_dict_metadata)
    assert {k.removeprefix("model.") for k in saved if k.startswith("model.")} == adapters, saved
    from safetensors.torch import load_file

    adapter_file = load_file(checkpoint_dir(run, 1) / "adapter_model.safetensors")
    assert len(adapter_file) == len(adapters) and all("lora_" in k for k in adapter_file)
    model = lora_model()
    optimizer = optimizer_of(model)
    load_checkpoint(checkpoint_dir(run, 1), model, optimizer, cpu)
    assert_same_states(expected["states"], full_states(model, optimizer))

    # The merged weights the 2 ranks published are the 1-rank policy's, byte for byte.
    sync, _ = weight_sync(tmp_path / "lora-alone")
    publish(sync, model, 1)
    model.load_state_dict(expected["after"])
    publish(sync, model, 2)
    sync.close()
    for version in (1, 2):
        assert digest(run / "weights" / f"v{version}") == digest(tmp_path / "lora-alone" / "weights" / f"v{version}")
    merged = AutoModelForCausalLM.from_pretrained(run / "weights" / "v2").state_dict()
    assert all(torch.equal(merged[k], v) for k, v in lora.merged_state_dict(model).items())
    assert not any(torch.equal(merged[k], v) for k, v in build_model(0).state_dict().items()
                   if k.endswith("q_proj.weight"))  # the adapters are merged in: the weights moved


if __name__ == "__main__":
    rank_main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
    end_rank(0)  # not through the interpreter's finalization, where gloo's threads can abort it
