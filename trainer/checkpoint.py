"""Train-state checkpoints: ``checkpoints/step-<N>/`` holds the weights (HF directory; with
LoRA, only the adapter, in peft's format), ``train_state.pt`` (optimizer, RNG states) and
``state.json`` (step, version, event cursor, dataset progress), ``fold.json`` (the run state
folded to that commit: processes start from it, docs/design.md §15.47 Processes start from
the checkpoint's fold), written like published
weights (``write_model_dir``: fsync, sha256 manifest written last, atomic rename), so a
directory with a manifest is complete by construction. Also the exported model,
``models/<output_model_id>/`` (merged, with LoRA).
"""
from __future__ import annotations

import json
import logging
import random
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch

from rlstream.core import weights
from rlstream.core.errors import ConfigError, RlstreamError
from rlstream.core.fold_snapshot import FOLD_FILE
from rlstream.trainer import lora
from rlstream.trainer.policy_model import write_model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointState:
    step: int
    version: int
    events_cursor: str  # the StepCommitted event of ``step`` (or "0-0"): replay starts after it
    rows_admitted: int  # the producer's dataset cursor at that point (informational; producers fold events)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def save_checkpoint(run_dir: Path, state: CheckpointState, model, tokenizer, optimizer,
                    final: Path | None = None, fold: str | None = None) -> Path:
    """``checkpoints/step-<N>/``, or ``final`` (an SDK state saved by name). ``fold``: the run
    state folded to the commit (``core/fold_snapshot.py``), written as ``fold.json``."""
    def train_state(tmp: Path) -> None:
        if fold is not None:
            (tmp / FOLD_FILE).write_text(fold)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng}, tmp / "train_state.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state)))

    final = final or checkpoint_dir(run_dir, state.step)
    saved = lora.AdapterFiles(model) if lora.is_lora(model) else model  # LoRA: the adapter, not the frozen base
    write_model_dir(final, saved, tokenizer, version=state.version, extra_files=train_state)
    log.info("checkpoint step %d -> %s", state.step, final)
    return final


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


def load_checkpoint(path: Path, model, optimizer, device) -> CheckpointState:
    """Load weights (a LoRA policy: its adapter), optimizer and RNG states in place; return
    the recorded state."""
    if lora.holds_adapter(path) != lora.is_lora(model):
        held, ours = ("a LoRA adapter", "full fine-tuning (lora_rank = 0)") if lora.holds_adapter(path) else (
            "full weights", "LoRA (lora_rank > 0)")
        raise RlstreamError(f"checkpoint {path} holds {held} but this run trains with {ours}: its optimizer state "
                            "cannot carry over. Set lora_rank as the run that wrote it did, or start without it")
    if lora.is_lora(model):
        lora.load_adapter(path, model, device)
    else:
        _load_weights(path, model, device)
    train_state = _load_train_state(path / "train_state.pt", device)
    optimizer.load_state_dict(train_state["optimizer"])
    torch.set_rng_state(train_state["rng"]["torch"].cpu())
    random.setstate(train_state["rng"]["python"])
    if "cuda" in train_state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(train_state["rng"]["cuda"])
    return read_state(path)


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


def _load_train_state(path: Path, device) -> dict:
    """``weights_only=True``: tensors, numbers, strings and containers only (optimizer
    state, the RNG ByteTensors, ``random.getstate()``'s tuple). A checkpoint may come from
    anyone (``init_from_checkpoint``); a full unpickle would run whatever code it names."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # torch raises the unpickler's error for any object outside the allow-list
        raise RlstreamError(f"{path} holds objects other than tensors and plain containers, so it was not "
                            f"loaded (a pickle can run code): {str(exc).splitlines()[0]}. Use a checkpoint "
                            "rlstream wrote, or re-create this one from a source you trust") from None


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
    """``output_model_id``: a standalone HF directory that ``from_pretrained`` loads."""
    final = weights.child_dir(run_dir / "models", model_id)  # the config checks it too; this replaces a dir
    write_model_dir(final, model, tokenizer, version=-1)
    return final
