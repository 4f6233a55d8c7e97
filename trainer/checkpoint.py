"""Train-state checkpoints: ``checkpoints/step-<N>/`` holds the train state in
``dcp/`` (torch.distributed.checkpoint: the trainable weights and the optimizer, each rank
writing its own shards; loadable at any number of ranks), each rank's RNG streams in
``rng/rank-<r>.pt``, the weights as an HF directory (with LoRA, only the adapter, in peft's
format) for ``from_pretrained`` and export, ``state.json`` (step, version, event cursor,
dataset progress) and ``fold.json`` (the run state folded to that commit: processes start
from it, docs/design.md §15.47 Processes start from the checkpoint's fold). Every rank writes
into one temp directory; rank 0 writes the rest, then seals it (``weights.seal``: every file
fsynced, sha256 manifest written last, atomic rename), so a directory with a manifest is
complete by construction (docs/design.md §15.80 Checkpoints with torch.distributed.checkpoint).
Checkpoints written before (``train_state.pt`` beside the HF weights) still load, at one rank.
Also the exported model, ``models/<output_model_id>/`` (merged, with LoRA).
"""
from __future__ import annotations

import functools
import io
import json
import logging
import pickle
import random
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from rlstream.core import weights
from rlstream.core.disk import newest_sibling_bytes, space_guard
from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.fold_snapshot import FOLD_FILE
from rlstream.trainer import lora, sharded
from rlstream.trainer.policy_model import all_finite, nonfinite_refusal, write_model_dir

log = logging.getLogger(__name__)
DCP_DIR, RNG_DIR, LEGACY_TRAIN_STATE = "dcp", "rng", "train_state.pt"


@dataclass(frozen=True)
class CheckpointState:
    step: int
    version: int
    events_cursor: str  # the StepCommitted event of ``step`` (or "0-0"): replay starts after it
    rows_admitted: int  # the producer's dataset cursor at that point (informational; producers fold events)
    # A LoRA checkpoint's base weights (``weights.weights_fingerprint`` of the base model's directory): the checkpoint
    # holds only the adapter, which means something only on that base. None: full weights, or written before.
    base_fingerprint: str | None = None


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def save_checkpoint(run_dir: Path, state: CheckpointState, model, tokenizer, optimizer,
                    final: Path | None = None, fold: str | None = None) -> Path:
    """``checkpoints/step-<N>/``, or ``final`` (an SDK state saved by name). ``fold``: the run
    state folded to the commit (``core/fold_snapshot.py``), written as ``fold.json``.

    Under torch.distributed every rank calls it (it holds collectives): rank 0 makes the temp
    directory, every rank writes its shards of the train state (``dcp/``) and its RNG streams
    into it, the full weights are gathered to rank 0, which writes them, ``fold.json`` and
    ``state.json``, then seals the directory once every rank's files are in. An error on any
    rank is raised on every rank; the temp directory, never sealed, is not a checkpoint."""
    rank, _ = sharded.rank_world()
    final = final or checkpoint_dir(run_dir, state.step)
    tmp = weights.tmp_dir(final)
    # A full disk: rank 0's temp dir goes, DiskFull says where. The first checkpoint has no predecessor to
    # size it by: it holds the weights, the optimizer's two moments and their HF copy, ~4x a weights version.
    with space_guard(final, "checkpoint", partial=tmp if rank == 0 else None,
                     needed=lambda: 4 * newest_sibling_bytes(run_dir / "weights" / "v0")):
        _save_checkpoint(tmp, final, rank, state, model, tokenizer, optimizer, fold)
    log.info("checkpoint step %d -> %s", state.step, final)
    return final


def _save_checkpoint(tmp: Path, final: Path, rank: int, state: CheckpointState, model, tokenizer, optimizer,
                     fold: str | None) -> None:
    sharded.on_rank0(lambda: _fresh_dir(tmp))
    full = sharded.full_state_dict(model) if sharded.is_sharded(model) else None  # collective when sharded
    _save_train_state(tmp / DCP_DIR, model, optimizer)  # collective: every rank its shards
    sharded.together(lambda: _save_rng(tmp / RNG_DIR / f"rank-{rank}.pt"))  # every rank's files are in

    def seal() -> None:
        saved = _saved_model(model, full)
        if not all_finite(saved):  # docs/design.md §15.33 Non-finite steps are skipped, never published
            raise RlstreamError(nonfinite_refusal(final, state.version))
        saved.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if fold is not None:
            (tmp / FOLD_FILE).write_text(fold)
        (tmp / "state.json").write_text(json.dumps(asdict(state)))
        weights.seal(tmp, final, state.version)  # the manifest last, then the rename

    sharded.on_rank0(seal)  # returns on every rank once rank 0 sealed it (or raises what failed there)


def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # what a crashed save left
    path.mkdir(parents=True)


def _saved_model(model, full: dict[str, torch.Tensor] | None):
    """The checkpoint's HF files: the weights (a LoRA policy: the adapter, not the frozen
    base), from the gathered ``full`` state dict when the model is sharded."""
    if lora.is_lora(model):
        return lora.AdapterFiles(model, full)
    return model if full is None else sharded.StateModel(model, full)


def train_state(model, optimizer) -> dict[str, Any]:
    """What ``dcp/`` holds, as torch.distributed.checkpoint's ``get_state_dict`` names it (by
    parameter name, so it loads at another number of ranks): the trainable weights (a LoRA
    policy: the adapters; its frozen base is the run's ``base_model``) and the optimizer."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    if lora.is_lora(model):
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model_state = {k: v for k, v in model_state.items() if k in trainable}
    return {"model": model_state, "optimizer": optimizer_state}


def _save_train_state(directory: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp

    with _single_process_quiet():
        dcp.save(train_state(model, optimizer), storage_writer=dcp.FileSystemWriter(directory),
                 no_dist=not sharded.in_group())


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns at every save and load without a process group that it assumes one process:
    the trainer's normal case, not news."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _save_rng(path: Path) -> None:
    path.parent.mkdir(exist_ok=True)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, path)


def complete_checkpoints(run_dir: Path) -> Iterator[Path]:
    """Complete checkpoints, newest first; incomplete or corrupt ones are skipped with a warning."""
    candidates = sorted((run_dir / "checkpoints").glob("step-*"),
                        key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    for path in reversed(candidates):
        try:
            _verify(path)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
            continue
        yield path


def _verify(path: Path) -> None:
    """The sealed directory matches the digest its manifest (written last) records."""
    weights.verify(path, json.loads((path / weights.MANIFEST).read_text())["sha256"])


def verify_checkpoint(path: Path, what: str = "init_from_checkpoint") -> Path:
    """A checkpoint given by the user (not found by ``complete_checkpoints``) is checked too."""
    try:
        _verify(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{what} {str(path)!r} is not a complete checkpoint ({exc}); point it at a "
                          "runs/<run>/checkpoints/step-<N> directory") from None
    return path


def read_state(path: Path) -> CheckpointState:
    return CheckpointState(**json.loads((path / "state.json").read_text()))


def holds_commit(path: Path, events_cursor: str) -> bool:
    """``path`` is a checkpoint taken right after the commit ``events_cursor``. A checkpoint
    of a step that was re-committed (Redis lost the first commit) is not, and gets replaced."""
    try:
        return read_state(path).events_cursor == events_cursor
    except (OSError, ValueError, TypeError):
        return False


def load_checkpoint(path: Path, model, optimizer, device, base_fingerprint: str | None = None) -> CheckpointState:
    """Load weights (a LoRA policy: its adapter), optimizer and RNG states in place; return
    the recorded state. A checkpoint with ``dcp/`` loads at any number of ranks (every rank
    calls this: a collective), whatever number wrote it; one written before (``train_state.pt``)
    at one rank, into an unsharded model. ``base_fingerprint``: of the base a LoRA ``model`` was
    built on; a LoRA checkpoint recorded on another base is refused (docs/design.md §15.95 A
    LoRA checkpoint names the base it was trained on)."""
    if lora.holds_adapter(path) != lora.is_lora(model):
        held, ours = ("a LoRA adapter", "full fine-tuning (lora_rank = 0)") if lora.holds_adapter(path) else (
            "full weights", "LoRA (lora_rank > 0)")
        raise RlstreamError(f"checkpoint {path} holds {held} but this run trains with {ours}: its optimizer state "
                            "cannot carry over. Set lora_rank as the run that wrote it did, or start without it")
    if lora.is_lora(model) and base_fingerprint is not None:
        check_base(path, read_state(path).base_fingerprint, base_fingerprint)
    kernels = [(group.get("fused"), group.get("foreach")) for group in optimizer.param_groups]
    if (path / DCP_DIR).is_dir():
        if lora.is_lora(model):
            lora.check_adapter_config(path, model)
        _load_train_state(path, model, optimizer)
        _set_rng(_load_trusted(_rng_file(path), torch.device("cpu")))
    else:
        _load_legacy(path, model, optimizer, device)
    keep_kernels(optimizer, kernels)
    return read_state(path)


def keep_kernels(optimizer, kernels: list[tuple[bool | None, bool | None]]) -> None:
    """The optimizer's own choice of kernel (``make_optimizer``'s ``fused``/``foreach``, each
    group's) over the loaded param groups': a checkpoint holds hyper-parameters, and how this
    process computes the update is this device's business. Each ``step`` counter then goes where
    that kernel keeps it, on the parameter's device for the fused (or capturable) one, on the
    CPU for the others (one written before fused AdamW would otherwise run the unfused loop with
    its counters on the device: two syncs a parameter a step on a GPU); design §15.96 AdamW runs
    fused where the device has the kernel."""
    for group, (fused, foreach) in zip(optimizer.param_groups, kernels):
        group["fused"], group["foreach"] = fused, foreach
        on_device = bool(fused or group.get("capturable"))
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            if torch.is_tensor(step):
                state["step"] = step.to(p.device if on_device else torch.device("cpu"))


def check_base(path: Path, recorded: str | None, current: str) -> None:
    """A LoRA checkpoint's adapter was trained on the base ``recorded`` names; this run's is
    ``current``. Another base of the same shapes would load without an error and train
    nonsense, so it is refused; a checkpoint written before bases were recorded is loaded, with
    a warning."""
    if recorded is None:
        log.warning("checkpoint %s does not record which base weights its LoRA adapter was trained on (written "
                    "before rlstream recorded it): make sure base_model is that run's", path)
    elif recorded != current:
        raise RlstreamError(f"checkpoint {path} holds a LoRA adapter trained on other base weights than base_model's "
                            f"now (fingerprint {recorded[:12]} recorded, {current[:12]} now): the adapter means "
                            "nothing on another base. Set base_model back to the directory that run trained on, or "
                            "start without this checkpoint")


def _load_train_state(path: Path, model, optimizer) -> None:
    """``dcp/`` into this rank's pieces of ``model`` and ``optimizer`` (resharded from however
    many ranks wrote it). Read as untrusted: its metadata and objects are unpickled only as
    plain data (``_trusted_classes``)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    reader, planner = _trusted_classes()
    state = train_state(model, optimizer)
    try:
        with _single_process_quiet():
            dcp.load(state, storage_reader=reader(path / DCP_DIR), planner=planner(), no_dist=not sharded.in_group())
    except (Exception, CheckpointException) as exc:  # DCP's, a BaseException, carries every rank's failure
        if UNTRUSTED in str(exc):
            raise RlstreamError(f"{path / DCP_DIR} holds objects other than tensors and plain data, so it was not "
                                f"loaded ({UNTRUSTED}). Use a checkpoint rlstream wrote, or re-create this one "
                                "from a source you trust") from None
        raise RlstreamError(f"checkpoint {path} does not fit the model and optimizer ({_first_line(exc)}): was it "
                            "written for another base_model or optimizer?") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=not lora.is_lora(model)))


def _rng_file(path: Path) -> Path:
    """This rank's RNG file; at a rank the saving run did not have, rank 0's (logged)."""
    rank, _ = sharded.rank_world()
    own = path / RNG_DIR / f"rank-{rank}.pt"
    if own.is_file():
        return own
    log.warning("checkpoint %s was written by fewer ranks: rank %d starts from rank 0's RNG streams", path, rank)
    return path / RNG_DIR / "rank-0.pt"


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _load_legacy(path: Path, model, optimizer, device) -> None:
    """A checkpoint written before ``dcp/`` (HF weights or adapter, ``train_state.pt``)."""
    if sharded.is_sharded(model):
        raise RlstreamError(f"checkpoint {path} was written in the single-process format (train_state.pt), which "
                            "loads into one unsharded trainer only: resume it with one rank, let it write a "
                            "checkpoint (dcp/), then go on with more ranks")
    if lora.is_lora(model):
        lora.load_adapter(path, model, device)
    else:
        _load_weights(path, model, device)
    train_state = _load_trusted(path / LEGACY_TRAIN_STATE, device)
    optimizer.load_state_dict(train_state["optimizer"])
    _set_rng(train_state["rng"])


def _load_weights(path: Path, model, device) -> None:
    from safetensors.torch import load_file

    state_dict: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        state_dict.update(load_file(str(f), device=str(device)))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # a tied lm_head is saved once, as the embedding
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if model.config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RlstreamError(f"checkpoint {path} does not fit the model (missing {sorted(set(missing) - tied)}, "
                            f"unexpected {sorted(unexpected)}): was it written for another base_model?")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def _load_trusted(path: Path, device) -> dict:
    """``weights_only=True``: tensors, numbers, strings and containers only (optimizer
    state, the RNG ByteTensors, ``random.getstate()``'s tuple). A checkpoint may come from
    anyone (``init_from_checkpoint``); a full unpickle would run whatever code it names."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # torch raises the unpickler's error for any object outside the allow-list
        raise RlstreamError(f"{path} holds objects other than tensors and plain containers, so it was not "
                            f"loaded (a pickle can run code): {_first_line(exc)}. Use a checkpoint "
                            "rlstream wrote, or re-create this one from a source you trust") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


UNTRUSTED = "a pickle can run code"
# What a DCP ``.metadata`` pickle names (torch 2.13): the metadata module's dataclasses, sizes,
# dtypes, layouts and the checkpoint's path. Names, not modules: a dotted name would reach
# whatever the module imports.
_METADATA_CLASSES = ("ChunkStorageMetadata", "_MEM_FORMAT_ENCODING", "TensorProperties", "TensorStorageMetadata",
                     "BytesStorageMetadata", "StorageMeta", "Metadata", "MetadataIndex")
_METADATA_GLOBALS = frozenset(
    {("torch.distributed.checkpoint.metadata", n) for n in _METADATA_CLASSES}
    | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    | {("pathlib", n) for n in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")})


class _MetadataUnpickler(pickle.Unpickler):
    """A DCP ``.metadata`` file as plain data: any global outside ``_METADATA_GLOBALS`` (or a
    torch dtype) is refused before anything is called. Not torch's own weights-only unpickler
    (what ``torch.load(weights_only=True)`` uses): DCP writes this file with ``pickle.dump`` at
    protocol 4, whose FRAME opcode (149) that unpickler refuses (torch 2.13, measured); and not
    msgpack: the format is torch's."""

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _METADATA_GLOBALS or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's metadata ({UNTRUSTED})")


@functools.cache
def _trusted_classes():
    """The reader and planner ``_load_train_state`` reads ``dcp/`` with, built on first use
    (torch.distributed.checkpoint is imported by the trainer only)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        """``FileSystemReader`` whose metadata is unpickled as plain data (``_MetadataUnpickler``)."""

        def read_metadata(self, *args, **kwargs):
            with open(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class Planner(DefaultLoadPlanner):
        """``DefaultLoadPlanner`` whose non-tensor values (the optimizer's hyperparameters) are
        loaded with ``weights_only=True`` (the default planner unpickles them fully)."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as exc:
                raise RlstreamError(f"{read_item.dest_index.fqn}: {_first_line(exc)} ({UNTRUSTED})") from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return Reader, Planner


@contextmanager
def rng_untouched(device: torch.device) -> Iterator[None]:
    """Run the body without advancing the training RNG streams (torch on CPU and on
    ``device``, Python's ``random``). Evaluation samples; replay does not evaluate, so
    evaluation must not move the RNG a checkpoint snapshots, or replay would diverge."""
    devices = []
    if device.type != "cpu":
        module = torch.get_device_module(device.type)
        current = getattr(module, "current_device", lambda: 0)  # mps has one device and no current_device()
        devices = [device.index if device.index is not None else current()]
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type):
            yield
    finally:
        random.setstate(python_state)


def export_model(model, tokenizer, run_dir: Path, model_id: str) -> Path:
    """``output_model_id``: a standalone HF directory that ``from_pretrained`` loads. A sharded
    model: every rank calls it (the gather), rank 0 writes it."""
    final = weights.child_dir(run_dir / "models", model_id)  # the config checks it too; this replaces a dir
    if not sharded.is_sharded(model):
        write_model_dir(final, model, tokenizer, version=-1)
        return final
    full = sharded.full_state_dict(model)
    sharded.on_rank0(lambda: write_model_dir(final, model, tokenizer, version=-1, full=full))
    return final
