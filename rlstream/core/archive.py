"""The rollouts archive: committed rollouts moved out of Redis into the run directory
(docs/design.md §15.45 Archive, then trim). Once a checkpoint covers a step, the trainer
copies every rollouts-stream entry below a safe bound (nothing pending, nothing undelivered)
into an append-only segment file and only then trims the stream (``trainer/retention.py``);
every reader of the whole stream reads this archive first and the stream after it.

Layout, under ``<run_dir>/archive/``:

- ``seg-000001.jsonl``, ... JSON Lines. Line 1 is a header naming the format, its version,
  the run, the stream, the id range ``(after, before)`` of the archive pass that wrote it and
  the checkpointed step that allowed it; every other line is one stream entry ``{"id": "<ms>-<seq>", "m": "<base64
  of the entry's exact bytes>"}``. The bytes are the stream's own (the codec's msgpack), so
  a reader decodes, validates and replays exactly what the trainer read; ``rlstream export``
  writes the decoded, data-tool friendly form.
- ``manifest.json``: the segments in order, each with its first and last id, entry count,
  size and sha256; ``upto``, the highest id archived. It is the authority: a segment it
  does not list is an orphan of a crash (its entries are still in the stream) and is
  ignored with a warning; a segment it lists that is missing or whose digest differs stops
  every reader with an ``ArchiveError`` naming it.

Segments and the manifest are written to a temp file, fsynced and renamed (then the
directory fsynced), so a reader never sees half of either.
"""
from __future__ import annotations

import base64
import bisect
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import redis

from rlstream.core import keys
from rlstream.core.bus import FIELD, as_text, xrange_all
from rlstream.core.disk import space_guard
from rlstream.core.errors import RlstreamError
from rlstream.core.weights import fsync_dir

log = logging.getLogger(__name__)
FORMAT = "rlstream-rollouts-archive"
VERSION = 1
MANIFEST = "manifest.json"
SEGMENT_GLOB = "seg-*.jsonl"


class ArchiveError(RlstreamError):
    """A segment the manifest lists is missing or damaged, or the manifest is unreadable."""


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (``"12-3"`` -> (12, 3))."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Segment:
    file: str
    first_id: str
    last_id: str
    entries: int
    bytes: int
    sha256: str
    covered_step: int  # the checkpointed step whose archive pass wrote it


def _atomic_write(path: Path, lines: Iterable[bytes]) -> tuple[int, str]:
    """Write ``lines`` to ``path`` via a fsynced temp file and a rename: (bytes, sha256)."""
    tmp = path.with_name(f".{path.name}.tmp")
    digest, size, pending = hashlib.sha256(), 0, iter(lines)

    def needed() -> int:
        """On a full disk: the lines not yet written are counted (not written), so the message says
        what the file needs even for a run's first segment, which has no older sibling to go by."""
        try:
            return size + sum(len(line) for line in pending)
        except Exception:  # noqa: BLE001 - the source failed too: what was counted is all that is known
            return size

    with space_guard(path, "the archive file", partial=tmp, needed=needed), open(tmp, "wb") as f:
        for line in pending:
            size += len(line)  # before the write: a line the full disk refused counts as needed
            f.write(line)
            digest.update(line)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return size, digest.hexdigest()


class Archive:
    """One run's archive directory (it may not exist yet: an empty archive)."""

    def __init__(self, run_dir: Path, run_id: str):
        self.dir, self.run_id = Path(run_dir) / "archive", run_id
        self._cache: dict[str, dict[str, bytes]] = {}  # file -> entries, the last few loaded
        self._manifest: tuple[tuple, dict] | None = None  # ((inode, mtime_ns, size), data): parsed once per change

    # ------------------------------------------------------------------ manifest
    def manifest(self) -> dict:
        path = self.dir / MANIFEST
        try:
            stat = path.stat()
        except FileNotFoundError:
            return {"format": FORMAT, "version": VERSION, "run_id": self.run_id, "upto": None, "segments": []}
        if self._manifest is not None and self._manifest[0] == (stat.st_ino, stat.st_mtime_ns, stat.st_size):
            return self._manifest[1]
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or data.get("version") != VERSION:
                raise ValueError(f"format {data.get('format')!r} version {data.get('version')!r}")
            [Segment(**s) for s in data["segments"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArchiveError(f"the rollouts archive manifest {path} is unreadable ({exc}): the archived rollouts "
                               "cannot be read. Restore it from a backup; do not delete it") from None
        self._manifest = ((stat.st_ino, stat.st_mtime_ns, stat.st_size), data)
        return data

    def segments(self) -> list[Segment]:
        return [Segment(**s) for s in self.manifest()["segments"]]

    def upto(self) -> str | None:
        """The highest stream id archived (every entry at or below it is in a segment)."""
        return self.manifest()["upto"]

    def _write_manifest(self, segments: list[Segment], upto: str | None) -> None:
        data = {"format": FORMAT, "version": VERSION, "run_id": self.run_id, "stream": keys.rollouts(self.run_id),
                "upto": upto, "segments": [asdict(s) for s in segments]}
        _atomic_write(self.dir / MANIFEST, [json.dumps(data, indent=1).encode()])

    # ------------------------------------------------------------------ writing
    def append(self, entries: Iterable[tuple[str, bytes]], *, after: str | None, before: str,
               covered_step: int) -> Segment | None:
        """Write ``entries`` (stream order, ids in ``(after, before)``) as the next segment,
        then list it in the manifest. None (nothing written) when there are none."""
        self.dir.mkdir(parents=True, exist_ok=True)
        segments = self.segments()
        name = f"seg-{len(segments) + 1:06d}.jsonl"  # a crash's orphan of this name is replaced whole
        seen = {"first": None, "last": None, "n": 0}

        def lines() -> Iterator[bytes]:
            yield json.dumps({"format": FORMAT, "version": VERSION, "run_id": self.run_id,
                              "stream": keys.rollouts(self.run_id), "after": after, "before": before,
                              "covered_step": covered_step, "encoding": "m = base64 of the entry's msgpack bytes "
                              "(rlstream.core.codec)"}).encode() + b"\n"
            for entry_id, raw in entries:
                seen["first"] = seen["first"] or entry_id
                seen["last"], seen["n"] = entry_id, seen["n"] + 1
                yield json.dumps({"id": entry_id, "m": base64.b64encode(raw).decode()}).encode() + b"\n"

        size, digest = _atomic_write(self.dir / name, lines())
        if not seen["n"]:
            os.unlink(self.dir / name)
            return None
        segment = Segment(name, seen["first"], seen["last"], seen["n"], size, digest, covered_step)
        self._write_manifest([*segments, segment], seen["last"])
        log.info("archived %d rollouts (%s .. %s, %.1f MB) to %s", segment.entries, segment.first_id,
                 segment.last_id, size / 1e6, self.dir / name)
        return segment

    def rewind(self, steps: int) -> list[Segment]:
        """Redis lost writes (an OS crash) that the archive had followed: segments written
        after a step the events stream no longer records are moved to ``archive/discarded/``
        (their trim came later in the same append-only log, so it was lost too and their
        entries are still in the stream)."""
        segments = self.segments()
        keep = [s for s in segments if s.covered_step <= steps]
        if len(keep) == len(segments):
            return []
        (self.dir / "discarded").mkdir(exist_ok=True)
        self._write_manifest(keep, keep[-1].last_id if keep else None)
        for s in segments[len(keep):]:
            if (self.dir / s.file).exists():
                os.replace(self.dir / s.file, self.dir / "discarded" / s.file)
        log.warning("the events stream records %d steps but the archive followed step %d: moved %d segment(s) to "
                    "%s (Redis lost its last writes; their entries are still in the stream)", steps,
                    segments[-1].covered_step, len(segments) - len(keep), self.dir / "discarded")
        return segments[len(keep):]

    # ------------------------------------------------------------------ reading
    def problems(self) -> list[str]:
        """Every segment the manifest lists that is missing or damaged, as one line each
        (empty: the archive is whole). Reads every segment once."""
        out = []
        try:
            segments = self.segments()
        except ArchiveError as exc:
            return [str(exc)]
        for s in segments:
            try:
                self._load(s)
            except ArchiveError as exc:
                out.append(str(exc))
        listed = {s.file for s in segments}
        found = self.dir.glob(SEGMENT_GLOB) if self.dir.is_dir() else []
        orphans = sorted(p.name for p in found if p.name not in listed)
        if orphans:  # a crash between a segment and its manifest: the stream still holds the entries
            log.warning("ignoring %s in %s: not in the manifest (left by a crash mid-archive; the entries are still "
                        "in the stream)", orphans, self.dir)
        return out

    def _load(self, s: Segment) -> dict[str, bytes]:
        if s.file in self._cache:
            return self._cache[s.file]
        path = self.dir / s.file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ArchiveError(f"archive segment {path} is missing ({exc.strerror}): it holds rollouts "
                               f"{s.first_id} .. {s.last_id} ({s.entries}), trimmed from Redis. Restore it from a "
                               "backup; audit, replay and export cannot be exact without it") from None
        if hashlib.sha256(data).hexdigest() != s.sha256:
            raise ArchiveError(f"archive segment {path} is damaged (sha256 differs from {MANIFEST}): it holds rollouts "
                               f"{s.first_id} .. {s.last_id} ({s.entries}). Restore it from a backup")
        entries: dict[str, bytes] = {}
        for line in data.splitlines()[1:]:
            row = json.loads(line)
            entries[row["id"]] = base64.b64decode(row["m"])
        if len(entries) != s.entries:
            raise ArchiveError(f"archive segment {path} holds {len(entries)} entries, its manifest says {s.entries}")
        if len(self._cache) >= 2:  # readers walk steps in order: the last two segments cover a step
            self._cache.pop(next(iter(self._cache)))
        self._cache[s.file] = entries
        return entries

    def iter_entries(self, problems: list[str] | None = None) -> Iterator[tuple[str, bytes]]:
        """Every archived entry in stream order. A missing or damaged segment raises
        ``ArchiveError``, or, given a ``problems`` list, is appended to it (the caller must
        report it: ``audit`` fails with it) and the next segment is read."""
        for s in self.segments():
            try:
                entries = self._load(s)
            except ArchiveError as exc:
                if problems is None:
                    raise
                problems.append(str(exc))
                continue
            yield from entries.items()

    def fetch(self, entry_ids: list[str]) -> dict[str, bytes]:
        """The archived entries among ``entry_ids`` (raw bytes)."""
        segments = self.segments()
        lasts = [id_key(s.last_id) for s in segments]
        out: dict[str, bytes] = {}
        for entry_id in entry_ids:
            i = bisect.bisect_left(lasts, id_key(entry_id))
            if i < len(segments) and id_key(segments[i].first_id) <= id_key(entry_id):
                raw = self._load(segments[i]).get(entry_id)
                if raw is not None:
                    out[entry_id] = raw
        return out


# ---------------------------------------------------------------------- archive + stream


def all_rollouts(r: redis.Redis, archive: Archive, problems: list[str] | None = None) -> Iterator[tuple[str, bytes]]:
    """Every rollouts entry the run ever had, in stream order: the archive, then the stream
    after the archive's end (an entry both hold, after a crash between a segment and its
    trim, is read once). ``problems``: see ``Archive.iter_entries``."""
    yield from archive.iter_entries(problems)
    upto = archive.upto()
    yield from xrange_all(r, keys.rollouts(archive.run_id), start="-" if upto is None else "(" + upto)


def fetch_rollouts(r: redis.Redis, archive: Archive, entry_ids: list[str]) -> dict[str, bytes]:
    """Raw bytes of specific rollouts entries: from the stream, else from the archive
    (an id in neither is absent from the answer: the caller says what that means)."""
    stream = keys.rollouts(archive.run_id)
    with r.pipeline(transaction=False) as pipe:
        for entry_id in entry_ids:
            pipe.xrange(stream, entry_id, entry_id, count=1)
        replies = pipe.execute()
    out = {as_text(rep[0][0]): rep[0][1].get(FIELD, b"") for rep in replies if rep}
    missing = [e for e in entry_ids if e not in out]
    if missing:
        out.update(archive.fetch(missing))
    return out
