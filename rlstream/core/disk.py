"""A full disk (ENOSPC, or a quota: EDQUOT) while the run writes its directory: weights,
checkpoints, archive segments (docs/design.md §10 Failure semantics).

Every such writer writes a temp file or directory beside its target and renames it into place
last, so a full disk never leaves a directory that a reader trusts; what it leaves is the temp
one, which ``space_guard`` deletes (it frees what it held, and no reader looks at it). The
process then stops with ``DiskFull``: one line naming the path, the free space there and about
how much the write needs (the size of the newest complete sibling, e.g. the previous weights
version), with its own exit code, so that ``rlstream up`` stops the run instead of restarting the
process into the same full disk (a crash loop). Nothing is lost: after space returns, ``rlstream
up`` with the same run id continues from the last checkpoint and the streams.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from rlstream.core.errors import RlstreamError

log = logging.getLogger(__name__)
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FULL_MESSAGES = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))  # errors that wrap the OS's in their text


class DiskFull(RlstreamError):
    """No space left where the run writes: the process stops; the run continues once space returns."""

    exit_code = 75  # EX_TEMPFAIL: `rlstream up` stops the run on it (no restart into a full disk)


def disk_full_error(exc: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT ``OSError`` behind ``exc``, if any: itself, its cause or context, a
    failure torch.distributed.checkpoint collected (``CheckpointException.failures``), or an
    error of a native library that only says so in its text (safetensors)."""
    seen: set[int] = set()
    said: OSError | None = None  # only the text says so: the answer unless a real OSError is found
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return e
        if said is None and not isinstance(e, (OSError, redis.RedisError)) and any(m in str(e) for m in FULL_MESSAGES):
            said = OSError(errno.ENOSPC, str(e))  # SafetensorError: "I/O error: No space left on device (os error 28)"
        failures = getattr(e, "failures", None)  # torch's CheckpointException: {rank: (exception, trace)}
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        stack += [e.__cause__, e.__context__]
    return said


def redis_refusal(exc: BaseException | None) -> str | None:
    """Redis's ``MISCONF`` behind ``exc`` (it cannot write its AOF or RDB, a full disk most often):
    its text, else None."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, redis.ResponseError) and str(exc).startswith("MISCONF"):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def free_bytes(path: Path) -> int | None:
    """Free space on the filesystem holding ``path`` (its nearest existing ancestor)."""
    for p in [path, *path.parents]:
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def newest_sibling_bytes(target: Path) -> int:
    """The size of the newest complete file or directory beside ``target`` of its kind (the
    previous ``v<N>``, ``step-<N>``, segment): about what ``target`` needs."""
    prefix = target.name.rstrip("0123456789")
    siblings = [p for p in target.parent.glob(f"{prefix}*") if not p.name.startswith(".") and p != target] \
        if target.parent.is_dir() else []
    if not siblings:
        return 0
    return tree_bytes(max(siblings, key=lambda p: p.stat().st_mtime))


def run_dir_needs(run_dir: Path) -> int:
    """About what a run directory's next writes need: its newest weights version and checkpoint."""
    return sum(newest_sibling_bytes(Path(run_dir) / sub / name) for sub, name in (("weights", "v0"),
                                                                                    ("checkpoints", "step-0")))


def message(target: Path, what: str, needed: int) -> str:
    """One line: the path (absolute), the free space there, about how much is needed, what to do.
    ``rlstream up`` adds how to continue the run (its run id)."""
    free = free_bytes(target)
    needs = f"it needs about {human(needed)}" if needed else "how much it needs is not known"
    return (f"no space left on device writing {what} {Path(os.path.abspath(target))} "
            f"({human(free) if free is not None else 'unknown'} free there; {needs}): free space on that filesystem "
            "(or lower keep_weights / keep_checkpoints); the run continues from its last checkpoint")


@contextmanager
def space_guard(target: Path, what: str, partial: Path | None = None,
                needed: Callable[[], int] | None = None) -> Iterator[None]:
    """Turn a full disk while writing ``target`` (through ``partial``, its temp file or
    directory, deleted here) into ``DiskFull``; ``needed()``: about how much the write needs,
    when the newest sibling of ``target`` does not tell (called only on a full disk)."""
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        if isinstance(exc, DiskFull) or disk_full_error(exc) is None:
            raise
        held = tree_bytes(partial) if partial is not None and partial.exists() else 0
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
        size = max(needed() if needed is not None else 0, newest_sibling_bytes(target), held)
        text = message(target, what, size)
        log.error("%s", text)
        raise DiskFull(text) from None


def aof_refusal(r: Any, directory: Path) -> str | None:
    """Why the embedded redis-server (its files in ``directory``) refuses writes for want of
    disk, else None. A failed AOF write makes it answer every write with ``MISCONF`` until a
    later write succeeds (it retries by itself, and keeps what it accepted in memory meanwhile),
    so each role would crash on its next write: ``rlstream up`` stops the run instead, saying so."""
    info = r.info("persistence")
    if not info.get("aof_enabled") or info.get("aof_last_write_status", "ok") == "ok":
        return None
    aof = tree_bytes(directory / "appendonlydir") + tree_bytes(directory / "appendonly.aof") \
        if directory.is_dir() else 0
    free = free_bytes(directory)
    return (f"the embedded redis-server cannot write its AOF in {Path(os.path.abspath(directory))} "
            f"({human(free) if free is not None else 'unknown'} free there; the AOF is {human(aof)} and grows with "
            "the run, more while it is rewritten): it refuses every write (MISCONF) until it can; free space on that "
            "filesystem (see its redis.log there)")
