"""Published weight directories: digest, manifest, atomic publish. No torch here.

A version directory is complete once it holds ``manifest.json`` (written last, after
every file is fsynced), and is published by renaming a temp directory into place, so a
reader never sees a partial one; one it replaces is renamed aside, never deleted first.
``sha256`` in ``WeightsPublished`` is the digest of the directory: sha256 over the sorted
(file name, file sha256) pairs.

``write_linked_dir`` writes a version whose files but one are the same bytes in every version
(the trainer's background writer): those are hard links to the previous version's files, whose
content and digest are known, and only the new files, the directory and the manifest are
fsynced (docs/design.md §15.89 Weights link their unchanged files; the steps run on a frozen heap).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from rlstream.core.disk import space_guard

MANIFEST = "manifest.json"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(directory: Path) -> list[Path]:
    """Every file under ``directory`` but its manifest, subdirectories included (a checkpoint's
    ``dcp/``), sorted by path relative to it. A published weights directory is flat, so its
    digest is what it was before subdirectories counted."""
    return sorted((p for p in directory.rglob("*") if p.is_file() and p != directory / MANIFEST),
                  key=lambda p: p.relative_to(directory).as_posix())


def directory_digest(directory: str | Path) -> tuple[str, int, dict[str, str]]:
    """(digest, total bytes, per-file sha256) of every file but the manifest; a file in a
    subdirectory is named by its relative path (``dcp/.metadata``)."""
    directory = Path(directory)
    files = _files(directory)
    per_file = {p.relative_to(directory).as_posix(): _file_sha256(p) for p in files}
    h = hashlib.sha256()
    for name, digest in per_file.items():
        h.update(name.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest(), sum(p.stat().st_size for p in files), per_file


_SAMPLE = 256  # bytes read at each sampled place
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's size


def loaded_weight_files(directory: Path) -> list[Path]:
    """The weight files ``from_pretrained`` loads from ``directory``, in its order of preference
    (transformers 5): the file ``config.json``'s ``transformers_weights`` names, else
    ``model.safetensors``, else the files its index maps, else ``pytorch_model.bin``, else the
    files its index maps; [] when there is none. Other files (an HF Trainer checkpoint's
    ``optimizer.pt``, ``training_args.bin``, an index left behind by an earlier sharded save) are
    not the model's weights. A name from a file (the config, an index) must stay inside
    ``directory``: data, never a path to follow elsewhere."""
    explicit = None
    try:
        explicit = json.loads((directory / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        pass
    candidates = [str(explicit)] if explicit else []
    candidates += ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json"]
    for name in candidates:
        path = _inside(directory, name)
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            mapped = json.loads(path.read_text())["weight_map"].values()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path} is not a weights index ({exc})") from None
        return sorted({_inside(directory, str(n)) for n in mapped})
    return []


def _inside(directory: Path, name: str) -> Path:
    """``directory / name`` for a relative name that stays inside it once normalised (a link
    inside the directory is followed as from_pretrained follows it: the Hub's cache links
    every file to its blob)."""
    relative = Path(os.path.normpath(name))
    if relative.is_absolute() or relative.parts[:1] == ("..",):
        raise ValueError(f"{directory}: weight file {name!r} is outside the model directory")
    return directory / relative


def weights_fingerprint(directory: str | Path) -> str:
    """A digest that tells the weights of the HF directory ``directory`` from other weights,
    read in milliseconds whatever their size: of each file ``from_pretrained`` loads
    (``loaded_weight_files``), its name and size and, of a safetensors file, its whole header
    (names, dtypes, shapes, offsets) and 256 bytes at the start, middle and end of every tensor;
    of any other weight file (or a safetensors file that does not parse), 256 bytes at the start,
    middle and end of each 64th of it. Another model of the same shapes (another seed, a
    fine-tune, a merged adapter) differs in the sampled bytes of nearly every tensor; it is not a
    digest of every byte, so it does not prove two directories identical. Used to refuse a LoRA
    checkpoint on a base other than the one it was trained on (docs/design.md §15.95 A LoRA
    checkpoint names the base it was trained on)."""
    directory = Path(directory)
    files = loaded_weight_files(directory)
    if not files or not all(p.is_file() for p in files):
        raise ValueError(f"{directory} lacks the weight files from_pretrained would load "
                         f"({', '.join(p.name for p in files if not p.is_file()) or 'none found'})")
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.relative_to(directory).as_posix()}\0{size}\n".encode())
        with path.open("rb") as f:
            header, spans = _tensor_spans(f, size) if path.suffix == ".safetensors" else (b"", None)
            h.update(header)
            if spans is None:  # not a safetensors file (or not a readable one): equal spans of the whole file
                step = max(1, size // 64)
                spans = [(at, min(size, at + step)) for at in range(0, size, step)]
            for start, end in spans:
                for at in sorted({start, max(start, (start + end - _SAMPLE) // 2), max(start, end - _SAMPLE)}):
                    f.seek(at)
                    h.update(f.read(max(0, min(_SAMPLE, end - at))))
    return h.hexdigest()


def _tensor_spans(f, size: int) -> tuple[bytes, list[tuple[int, int]] | None]:
    """A safetensors file's header and each tensor's byte range in it, by name; (b"", None)
    when the file does not parse as one (its header too large, not a JSON map, an offset
    outside the data): the caller then samples the file as plain bytes."""
    if size < 8:
        return b"", None
    n = int.from_bytes(f.read(8), "little")
    if n > min(_MAX_HEADER, size - 8):
        return b"", None
    header = f.read(n)
    try:
        entries = json.loads(header)
    except (ValueError, RecursionError):
        return b"", None
    if not isinstance(entries, dict):
        return b"", None
    data = size - 8 - n
    spans = []
    for name in sorted(k for k in entries if k != "__metadata__"):
        offsets = entries[name].get("data_offsets") if isinstance(entries[name], dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data):
            return b"", None
        spans.append((8 + n + offsets[0], 8 + n + offsets[1]))
    return header, spans


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable (the directory entry itself)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(tmp_dir: str | Path, final_dir: str | Path, version: int) -> tuple[str, int]:
    """fsync every file of ``tmp_dir``, write its manifest, rename it to ``final_dir``."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    for p in _files(tmp_dir):
        with p.open("rb") as f:
            os.fsync(f.fileno())
    for d in (p for p in tmp_dir.rglob("*") if p.is_dir()):
        fsync_dir(d)  # a subdirectory's entries (its files' names) are durable too
    digest, size, per_file = directory_digest(tmp_dir)
    _write_manifest(tmp_dir, version, digest, size, per_file)
    _swap_in(tmp_dir, final_dir)
    return digest, size


def _digest_of(per_file: dict[str, str]) -> str:
    """``directory_digest``'s digest of these (name -> sha256) files."""
    h = hashlib.sha256()
    for name in sorted(per_file):
        h.update(name.encode() + b"\0" + per_file[name].encode() + b"\n")
    return h.hexdigest()


def _write_manifest(tmp_dir: Path, version: int, digest: str, size: int, per_file: dict[str, str]) -> None:
    """The manifest, written last and fsynced: from then on the directory is complete."""
    manifest = tmp_dir / MANIFEST
    manifest.write_text(json.dumps({"version": version, "sha256": digest, "bytes": size, "files": per_file}, indent=1))
    with manifest.open("rb") as f:
        os.fsync(f.fileno())


@dataclass(frozen=True)
class SameFile:
    """A file every version holds with the same bytes (``data``) and so the same ``sha256``."""

    data: bytes
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> SameFile:
        return cls(data, hashlib.sha256(data).hexdigest())


def write_linked_dir(final: Path, fill: Callable[[Path], None], *, version: int, same: dict[str, SameFile],
                     source: Path | None, known: dict[str, FileStamp]) -> tuple[str, int, bool]:
    """``write_dir`` of a directory holding the files ``same`` and whatever ``fill(tmp)`` adds
    (no subdirectory). Each file of ``same`` is a hard link to the file of that name in
    ``source`` (a complete directory written before, durable already) when that file is still
    the one ``known`` stamps (the same inode, size and modification time as when it was written
    with those bytes); else, or where a link fails, it is written from its bytes. Only the files
    written here are fsynced and hashed: a link's digest is its bytes', known, so a linked file
    that no longer holds them fails ``verify`` as any other would. Then the directory's entries
    are fsynced, the manifest written last, and it is renamed into place as ``seal`` does.
    ``known`` is updated to this directory's files. Returns (digest, bytes, False when the
    filesystem refused a hard link: every file was written, and links are not worth trying again)."""
    tmp = tmp_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    with space_guard(final, "weights", partial=tmp):  # a full disk: the temp dir goes, DiskFull says where
        tmp.mkdir(parents=True)
        # fill first: a file it wrote under a linked name would write through the link into every
        # version sharing it (a template name in fill's output is a caller's bug: refused)
        fill(tmp)
        clash = sorted(set(os.listdir(tmp)) & set(same))
        if clash:
            raise ValueError(f"write_linked_dir: fill wrote {clash}, which are the shared files' names")
        linked, refused = {}, False
        for name, same_file in same.items():
            made = _link_same(source / name, tmp / name, known.get(name)) if source is not None and not refused \
                else False
            if made:
                linked[name] = same_file.sha256
                continue
            refused = refused or made is None
            (tmp / name).write_bytes(same_file.data)
        per_file, size = {}, 0
        for entry in os.scandir(tmp):
            if entry.is_dir(follow_symlinks=False):  # not this function's kind of directory: sealed the long way
                known.clear()
                return (*seal(tmp, final, version), not refused)
            stat = entry.stat()
            size += stat.st_size
            if entry.name in same:
                known[entry.name] = FileStamp.of(stat)
            if entry.name in linked:
                per_file[entry.name] = linked[entry.name]
                continue
            path = Path(entry.path)
            with path.open("rb") as f:
                os.fsync(f.fileno())
            per_file[entry.name] = _file_sha256(path)
        fsync_dir(tmp)  # the links' names (and the written files'): no fsync of a linked file makes them durable
        per_file = dict(sorted(per_file.items()))
        digest = _digest_of(per_file)
        _write_manifest(tmp, version, digest, size, per_file)
        _swap_in(tmp, final)
        return digest, size, not refused


@dataclass(frozen=True)
class FileStamp:
    """What says a file is still the one written: its inode, size and modification time (an
    in-place write changes the last; a link does not)."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> FileStamp:
        return cls(stat.st_ino, stat.st_size, stat.st_mtime_ns)


def stamps(directory: Path, names: Iterable[str]) -> dict[str, FileStamp]:
    """The ``FileStamp`` of each of ``names`` in ``directory``."""
    return {name: FileStamp.of(os.stat(directory / name)) for name in names}


_NO_LINKS = (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP)


def _link_same(source: Path, target: Path, stamp: FileStamp | None) -> bool | None:
    """Hard-link ``source`` as ``target`` if it is still the file ``stamp`` describes: True;
    False when it is not (the bytes are written instead); None when the filesystem refuses hard links."""
    try:
        if stamp is None or FileStamp.of(os.stat(source)) != stamp:
            return False
        os.link(source, target)
        return True
    except OSError as exc:
        return None if exc.errno in _NO_LINKS else False


def _swap_in(tmp_dir: Path, final_dir: Path) -> None:
    """Rename ``tmp_dir`` to ``final_dir``. An existing ``final_dir`` (a re-run of the same
    step after a crash) is renamed aside first and deleted only once the new one is in
    place: a failure in between leaves the old directory, never neither."""
    aside = None
    if final_dir.exists():
        aside = final_dir.with_name(f".old-{final_dir.name}-{uuid.uuid4().hex[:8]}")
        os.rename(final_dir, aside)
    try:
        os.rename(tmp_dir, final_dir)
    except BaseException:
        if aside is not None:
            os.rename(aside, final_dir)
        raise
    fsync_dir(final_dir.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def version_dir(weights_root: str | Path, version: int) -> Path:
    """``<weights_root>/v<version>``, where version ``version`` is published. Readers derive
    it from their own run directory: the path in a ``WeightsPublished`` is never opened,
    so whoever can write to Redis cannot point a worker at a directory of their choosing."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"weights version {version!r} is not a non-negative int")
    return Path(weights_root) / f"v{version}"


def complete_versions(weights_root: str | Path) -> list[int]:
    """The versions under ``weights_root`` whose directory is complete (its manifest written),
    oldest first."""
    root = Path(weights_root)
    found = []
    for entry in root.glob("v*") if root.is_dir() else ():
        if entry.name[1:].isdigit() and (entry / MANIFEST).is_file():
            found.append(int(entry.name[1:]))
    return sorted(found)


def child_dir(parent: str | Path, name: str) -> Path:
    """``parent / name`` when ``name`` is one plain path component, else ValueError: a name
    such as ``..`` would make a replace-the-directory write land outside ``parent``."""
    if not name or name in (".", "..") or Path(name).name != name or "/" in name or "\\" in name:
        raise ValueError(f"{name!r} is not a plain directory name (it would leave {parent})")
    return Path(parent) / name


def verify(directory: str | Path, sha256: str) -> None:
    """Raise ValueError unless ``directory`` is complete and matches ``sha256``."""
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        raise ValueError(f"{directory} has no {MANIFEST}: not a complete published version")
    digest, _, _ = directory_digest(directory)
    if digest != sha256:
        raise ValueError(f"{directory}: sha256 {digest[:12]}… does not match the published {sha256[:12]}…")


def write_model_dir(final: Path, model: Any, tokenizer: Any, *, version: int,
                    extra_files: Callable[[Path], None] | None = None) -> tuple[str, int]:
    """Write the HF directory ``final`` atomically: model and tokenizer (plus whatever
    ``extra_files(tmp)`` adds) into a temp dir beside it, sealed (fsync, sha256 manifest
    written last) and renamed into place, so a reader never sees a partial directory.
    Returns the directory's (digest, bytes)."""
    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)  # handles tied embeddings (raw safetensors.save_file refuses them)
        tokenizer.save_pretrained(tmp)
        if extra_files is not None:
            extra_files(tmp)

    return write_dir(final, fill, version=version)


def tmp_dir(final: Path) -> Path:
    """Where ``final`` is written before it is sealed: beside it, so the rename stays on one filesystem."""
    return final.with_name(f".tmp-{final.name}")


def write_dir(final: Path, fill: Callable[[Path], None], *, version: int) -> tuple[str, int]:
    """Write the directory ``final`` atomically: ``fill(tmp)`` writes its files into a temp
    dir beside it (creating it), which is sealed and renamed into place. Returns its (digest, bytes)."""
    tmp = tmp_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    with space_guard(final, "weights", partial=tmp):  # a full disk: the temp dir goes, DiskFull says where
        fill(tmp)
        return seal(tmp, final, version)
