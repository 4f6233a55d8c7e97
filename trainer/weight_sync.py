"""The trainer's side of the weight sync, off the step's thread: each synced version written,
sealed, announced and the old ones pruned while the next step gathers and trains
(docs/design.md §15.79 Weights are written beside the next step).

``WeightSync.start`` runs on the step's thread right after the update: it waits for the
previous version if that is still being written (one at a time, so versions are announced in
order), copies the tensors of the weights file as they are now to CPU (``DirTemplate.snapshot``:
the next update changes the model in place) and hands them to the writer's thread. That thread
confirms the lease, writes and seals ``weights/v<N>`` (``weights.write_linked_dir``: the
weights file written and fsynced, the template's files hard links to the previous version's,
the directory fsynced, manifest last, rename; docs/design.md §15.89 Weights link their
unchanged files; the steps run on a frozen heap), then, once the step that produced v<N> is committed
(``Pending.committed``), XADDs its ``WeightsPublished`` (fenced by the lease, as every trainer
write) and prunes the versions past ``keep_weights``. A step that fails before its commit
cancels it (``Pending.cancel``): its directory may be written, it is never announced. An error
of the writer's thread is raised on the step's thread by the next ``wait``.

The writer's thread touches no model object (the step's thread is training it): it writes the
snapshot with safetensors (which lets go of the GIL while it writes) and the directory's other
files (config, generation config, tokenizer: none changes during a run) as the bytes
``save_pretrained`` wrote for the first version this trainer wrote (``DirTemplate``), once a
comparison of digests showed that this gives the very weights file ``save_pretrained`` writes.
A model for which it does not (sharded weights, renamed keys, custom code) keeps the
synchronous write (``write_weights``) on the step's thread; only its publish and prune move off
it.

A model sharded across torch.distributed ranks (FSDP2): every rank gathers its full weights on
the step's thread (``sharded.full_state_dict``, a collective: all ranks, in one order), rank 0
alone writes, seals and announces the directory from them as above (the gathered tensors are
its snapshot); the other ranks' versions are done at once (``Pending.nothing``). Without a
process group nothing of this runs (docs/design.md §15.80 Checkpoints with
torch.distributed.checkpoint).
"""
from __future__ import annotations

import functools
import json
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis
import torch

from rlstream.core import weights
from rlstream.core.errors import RlstreamError
from rlstream.core.messages import WeightsPublished
from rlstream.trainer import lora, sharded
from rlstream.trainer.commit import publish
from rlstream.trainer.lease import TrainerLease
from rlstream.trainer.policy_model import nonfinite_refusal, prune_weights, tensors_finite, weights_dir, write_weights

log = logging.getLogger(__name__)
WEIGHTS_FILE = "model.safetensors"
# The most one version's background write and announcement may take before the step's thread gives
# up on it (a disk or network filesystem that hangs): far above a healthy write of even a large model.
WRITE_BOUND_S = 1800.0  # save_pretrained's one file of an unsharded safetensors checkpoint


def state_of(model, full: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a published directory of ``model`` holds, by name (the live ones, detached;
    a LoRA policy's merged weights, ``lora.merged_state_dict``). ``full``: the gathered state
    dict of a sharded model, which they are taken from instead."""
    if full is not None:
        return lora.merged_from_full(model, full) if lora.is_lora(model) else full
    state = lora.merged_state_dict(model) if lora.is_lora(model) else model.state_dict()
    return {k: v.detach() for k, v in state.items()}


@dataclass(frozen=True)
class DirTemplate:
    """Everything a published directory of this trainer holds but its weights (``files``: name
    -> bytes), and its weights file's tensor names and metadata."""

    files: dict[str, bytes]
    keys: tuple[str, ...]
    metadata: dict[str, str] | None

    def snapshot(self, model, full: dict[str, torch.Tensor] | None = None,
                 into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """The tensors of ``model``'s weights file as they are now (``full``: as gathered, new
        tensors already), copied to CPU, in the dtypes in
        effect (call it inside ``Precision.published``): later updates leave them alone. None when
        one is not finite: what write_model_dir refuses (docs/design.md §15.33 Non-finite steps are
        skipped, never published); the update checked the float32 masters, this the cast to the
        published dtype. A copy, not the file's bytes: serializing holds the GIL for the whole
        copy, ``safetensors`` writing a file on the writer's thread does not. ``into``: tensors of
        the same names, shapes and dtypes to copy into (the writer process's shared memory) and
        return instead of new ones."""
        state = state_of(model, full)
        if into is not None and all(into[k].shape == state[k].shape and into[k].dtype == state[k].dtype
                                    for k in self.keys):
            for k in self.keys:
                into[k].copy_(state[k])
            tensors = into
        else:
            # A LoRA policy's merged weights are new tensors already, the rest its frozen base, which no update changes.
            copy = not lora.is_lora(model) and full is None
            tensors = {k: state[k].to("cpu", copy=copy) for k in self.keys}
        return tensors if tensors_finite(tensors.values()) else None

    @functools.cached_property
    def same(self) -> dict[str, weights.SameFile]:
        """The files every version holds unchanged, with their digests (for ``weights.write_linked_dir``)."""
        return {name: weights.SameFile.of(data) for name, data in self.files.items()}

    def write(self, directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        """The whole directory: the template's files from their bytes, and the weights file."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (directory / name).write_bytes(data)
        self.write_weights(directory, tensors)

    def write_weights(self, directory: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(directory / WEIGHTS_FILE), metadata=self.metadata)

    def write_dir(self, final: Path, tensors: dict[str, torch.Tensor], version: int, source: Path | None,
                  known: dict[str, weights.FileStamp]) -> tuple[str, int, bool]:
        """``final`` written with ``tensors`` as its weights file (``weights.write_linked_dir``: the
        other files linked to ``source``'s where they are the same, sealed, renamed into place):
        (digest, bytes, whether it linked). On the writer's thread or in the writer process."""
        return weights.write_linked_dir(final, lambda tmp: self.write_weights(tmp, tensors), version=version,
                                        same=self.same, source=source, known=known)


def dir_template(directory: Path, state: dict[str, torch.Tensor]) -> DirTemplate | None:
    """The template of ``directory``, a sealed version ``save_pretrained`` wrote from the
    weights ``state`` holds; None when ``DirTemplate.write`` would not give its weights file
    byte for byte (written once to a probe directory beside it and compared by sha256 with its
    manifest: a file, not bytes in memory, which for a large model would be one more copy)."""
    from safetensors import safe_open

    names = {p.name for p in directory.iterdir()} - {weights.MANIFEST}
    others = names - {WEIGHTS_FILE}
    if WEIGHTS_FILE not in names or any(n.endswith((".safetensors", ".index.json")) for n in others) \
            or not all((directory / n).is_file() for n in names):
        return None
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as f:
        keys, metadata = tuple(f.keys()), f.metadata()
    if not set(keys) <= set(state):
        return None
    expected = json.loads((directory / weights.MANIFEST).read_text())["files"][WEIGHTS_FILE]
    template = DirTemplate({n: (directory / n).read_bytes() for n in sorted(others)}, keys, metadata)
    probe = directory.with_name(f".probe-{directory.name}")
    shutil.rmtree(probe, ignore_errors=True)
    try:
        template.write(probe, {k: state[k].contiguous() for k in keys})
        same = weights.directory_digest(probe)[2][WEIGHTS_FILE] == expected
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return template if same else None


def _written() -> WeightsPublished:
    raise RuntimeError("a version's write runs once")


class Pending:
    """One version on the writer's thread: ``write()`` (the directory, sealed; already done for
    a synchronous write), then, once ``committed`` (not after ``cancel``), ``announce(written)``.
    ``seconds``: how long the write took, wherever it ran."""

    def __init__(self, version: int, write: Callable[[], WeightsPublished],
                 announce: Callable[[WeightsPublished], None], seconds: float = 0.0):
        self.version, self.write, self.announce, self.seconds = version, write, announce, seconds
        self.released, self.done, self.publish = threading.Event(), threading.Event(), False
        self.error: BaseException | None = None

    def committed(self) -> None:
        """The step that produced this version is committed: announce it once it is sealed."""
        self.publish = True
        self.released.set()

    def cancel(self) -> None:
        """The step was not committed: never announce this version."""
        self.released.set()

    @classmethod
    def nothing(cls, version: int) -> Pending:
        """A rank other than 0 of a sharded model: it took part in the gather, rank 0 writes and
        announces; its own version is done as soon as it is committed or cancelled."""
        pending = cls(version, lambda: None, lambda written: None)
        pending.done.set()
        return pending

    def run(self) -> None:
        try:
            t0 = time.monotonic()
            try:
                written = self.write()
            finally:
                # The snapshot's tensors (a CPU copy of the whole model, held by the write's closure) go as soon as
                # they are written, not when this object does: a garbage cycle that holds it (a caught exception's
                # frames, which run to the step's) waits for a collection, rare on a frozen heap (docs/design.md
                # §15.89 Weights link their unchanged files; the steps run on a frozen heap).
                self.write = _written
            self.seconds += time.monotonic() - t0
            self.released.wait()
            if self.publish:
                self.announce(written)
        except BaseException as exc:  # raised on the step's thread by WeightSync.wait
            self.error = exc
        finally:
            self.done.set()


class WeightSync:
    """The trainer's weight writes: ``start`` (a step's version, in the background),
    ``write_now`` (synchronous: resume's publish, a replay's final weights), ``wait`` (the one in
    flight), ``close``."""

    def __init__(self, r: redis.Redis, run_id: str, lease: TrainerLease, run_dir: Path, keep: int,
                 process: bool = False):
        self.r, self.run_id, self.lease, self.run_dir, self.keep = r, run_id, lease, run_dir, keep
        # ``trainer.weight_writer = "process"``: the files written by a child (``weight_writer``) from these
        # shared-memory tensors, which each version's snapshot is copied into (None: not started, or refused)
        self.use_process, self.writer, self.shared = process, None, None
        self.template: DirTemplate | None = None
        self.checked = False  # whether a version was written synchronously and ``template`` derived from it
        # The newest complete directory whose template files hold the template's bytes, which the next version
        # links to (None: none yet, or this filesystem refuses hard links: ``links`` False), and those files' stamps.
        self.previous: Path | None = None
        self.known: dict[str, weights.FileStamp] = {}
        self.links = True
        self.pending: Pending | None = None
        # One long-lived thread: starting one per version costs a context switch the step waits for (~1 ms on
        # 2 busy cores).
        self.jobs: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self.thread: threading.Thread | None = None

    def write_now(self, model, tokenizer, version: int) -> WeightsPublished | None:
        """Write ``weights/v<version>`` on this thread with ``save_pretrained`` and prune the old
        versions (``policy_model.write_weights``); the first such write gives the template. A
        sharded model: every rank calls it (the gather), rank 0 writes; None on the others."""
        self.wait()
        full = sharded.full_state_dict(model) if sharded.is_sharded(model) else None  # collective
        if full is None and sharded.is_sharded(model):
            return None
        return self._write_now(model, tokenizer, version, prune=True, full=full)

    def _write_now(self, model, tokenizer, version: int, prune: bool,
                   full: dict[str, torch.Tensor] | None = None) -> WeightsPublished:
        state = None if self.checked else state_of(model, full)  # the model does not change meanwhile: no copy
        written = write_weights(model, tokenizer, self.run_dir, version, self.keep if prune else None, full=full)
        if state is not None:
            self.template, self.checked = dir_template(weights_dir(self.run_dir, version), state), True
            if self.template is not None:  # its files hold the template's bytes: the next version links to them
                self.previous = weights_dir(self.run_dir, version)
                self.known = weights.stamps(self.previous, self.template.files)
            log.info("weights: each version is written %s", "in the background, from a snapshot" if self.template
                     else "on the step's thread (save_pretrained's directory could not be reproduced from a "
                     "snapshot: sharded, renamed or custom weights)")
        return written

    def start(self, model, tokenizer, version: int) -> Pending:
        """This version's directory, written and sealed in the background from a snapshot (inside
        ``Precision.published``), announced once ``committed`` is called. Without a template
        (the first write of this trainer, or a model it cannot write) it is written here. A
        sharded model: every rank calls it, on the step's thread (the gather is a collective);
        rank 0 goes on as above from the gathered tensors."""
        self.wait()
        full = sharded.full_state_dict(model) if sharded.is_sharded(model) else None  # collective
        if full is None and sharded.is_sharded(model):  # not rank 0: nothing to write
            self.pending = Pending.nothing(version)
            return self.pending
        if self.template is None:
            t0 = time.monotonic()
            self.lease.confirm()  # the directory of a version that another trainer may have published
            written = self._write_now(model, tokenizer, version, prune=False, full=full)
            pending = Pending(version, lambda: written, self.announce, seconds=time.monotonic() - t0)
        else:
            tensors = self.template.snapshot(model, full, into=self.shared)
            if tensors is not None and self.use_process and self.writer is None:
                tensors = self.start_writer(tensors)
            pending = Pending(version, lambda: self.write(tensors, version), self.announce)
        if self.thread is None:
            self.thread = threading.Thread(target=self.serve, name="weight-sync", daemon=True)
            self.thread.start()
        self.pending = pending
        self.jobs.put(pending)
        return pending

    def start_writer(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The writer process, on a shared copy of the snapshot ``tensors`` that every later
        snapshot is copied into; returns that copy. One that cannot start (no shared memory of that
        size, e.g. a container's small /dev/shm) leaves the files to the writer's thread, as
        ``"thread"`` does, and ``tensors`` as they were."""
        from rlstream.trainer.weight_writer import WriterProcess

        try:
            self.writer = WriterProcess(self.template, tensors)
            log.info("weights: the files of each version are written by a process of their own (pid %d)",
                     self.writer.process.pid)
        except Exception as exc:  # whatever stops it (no shared memory, no spawn, a pickling error): the thread
            log.warning("weights: the writer process could not start (%s); the writer's thread writes the files",
                        exc)
        self.use_process = self.writer is not None
        self.shared = self.writer.tensors if self.writer is not None else None
        return self.shared if self.shared is not None else tensors

    def serve(self) -> None:
        """The writer's thread: one version after another, until ``close``."""
        while (pending := self.jobs.get()) is not None:
            pending.run()

    def write(self, tensors: dict[str, torch.Tensor] | None, version: int) -> WeightsPublished:
        """The background write: ``weights/v<version>`` from the snapshot and the template, sealed."""
        template = self.template
        assert template is not None
        final = weights_dir(self.run_dir, version)
        if tensors is None:  # a non-finite weight (DirTemplate.snapshot): stop the trainer, nothing written
            raise RlstreamError(nonfinite_refusal(final, version))
        self.lease.confirm()  # the directory of a version that another trainer may have published
        source = self.previous if self.links else None
        if self.writer is not None and tensors is self.shared:
            digest, size, links, self.known = self.writer.write(final, version, source, self.known)
        else:
            digest, size, links = template.write_dir(final, tensors, version, source, self.known)
        self.previous, self.links = final, self.links and links
        return WeightsPublished(version=version, uri=str(final.resolve()), sha256=digest, bytes=size)

    def announce(self, written: WeightsPublished) -> None:
        publish(self.r, self.run_id, written, self.lease)
        # after the publish: the newest is out first
        if self.writer is not None:
            self.writer.prune(self.run_dir, written.version, self.keep)
        else:
            prune_weights(self.run_dir, written.version, self.keep)

    def wait(self) -> float:
        """Wait until the version in flight is written and announced (or cancelled); raise what
        failed there. Returns how long its write took (0.0: none was in flight)."""
        pending = self.pending
        if pending is None:
            return 0.0
        if not pending.released.is_set():
            raise RuntimeError(f"weights v{pending.version}: waited for before its step was committed or cancelled")
        self.pending = None
        if not pending.done.wait(WRITE_BOUND_S):
            if self.writer is not None:  # its hung write ends now: the writer's thread, waiting on it, with it
                self.writer.kill()
            where = weights_dir(self.run_dir, pending.version)
            raise RlstreamError(f"weights v{pending.version}: its write under {where} "
                                f"did not finish within {WRITE_BOUND_S:.0f}s; check that disk (and Redis, for the "
                                "announcement), then restart the trainer: resume writes and publishes it again")
        if pending.error is not None:
            raise pending.error
        return pending.seconds

    def close(self) -> None:
        """At the trainer's end: a version still in flight is finished (announced only if its
        step was committed); an error there is logged, not raised (the trainer is stopping)."""
        pending = self.pending
        if pending is not None:
            pending.cancel()  # a no-op once committed
            try:
                self.wait()
            except Exception as exc:
                log.error("weights v%d: %s", pending.version, exc)
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join(WRITE_BOUND_S)  # a daemon thread: one still hung does not keep the process alive
            self.thread = None
        if self.writer is not None:
            self.writer.close()
            self.writer, self.shared = None, None
