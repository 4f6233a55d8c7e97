"""``rlstream export RUN --out FILE``: every trained sample of a run, one JSON object per
line, in training order, for analysis or for training elsewhere.

Each ``StepCommitted`` names the rollouts entries it trained on; export reads them from the
run's archive or its rollouts stream (docs/design.md §15.45 Archive, then trim), decodes and
validates them with the codec, and writes one line per sample:

``step``, ``version`` (the version the step produced; it trained ``version - 1``),
``entry_id``, ``group_id``, ``sample_id``, ``row_index``, ``epoch``, ``tokens`` (prompt +
completion), ``logprobs`` (behaviour logprobs, 0.0 where not generated), ``loss_mask``,
``reward``, ``finish_reason``, ``text``, ``metrics`` (the rollout_fn's), ``worker_id``,
``submit_version``, ``min_version``, ``max_version``, and the offsets the trainer logs:
``version_offset`` = (version - 1) - min_version, ``submit_offset`` = (version - 1) -
submit_version.

Like ``audit`` it works on a finished run (starting its embedded redis-server from the run
directory's AOF for the time of the query). A sample in neither the stream nor the archive,
or a damaged segment, stops the export with an error naming it: an export is complete or
it fails. The file is written to a temp name and renamed at the end.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import redis

from rlstream.core import bus
from rlstream.core.archive import Archive, ArchiveError, fetch_rollouts
from rlstream.core.codec import DecodeError, decode
from rlstream.core.messages import RolloutRecord, StepCommitted


def sample_line(step: StepCommitted, entry_id: str, s: RolloutRecord) -> dict:
    trained = step.version - 1
    return {"step": step.step, "version": step.version, "entry_id": entry_id, "group_id": s.group_id,
            "sample_id": s.sample_id, "row_index": s.row_index, "epoch": s.epoch, "tokens": s.tokens.tolist(),
            "logprobs": s.logprobs.tolist(), "loss_mask": s.loss_mask.tolist(), "reward": s.reward,
            "finish_reason": s.finish_reason, "text": s.text, "metrics": s.metrics, "worker_id": s.worker_id,
            "submit_version": s.submit_version, "min_version": s.min_version, "max_version": s.max_version,
            "version_offset": trained - s.min_version, "submit_offset": trained - s.submit_version}


def export_lines(r: redis.Redis, run_id: str, run_dir: Path) -> Iterator[dict]:
    """One dict per trained sample, step by step, in the order each step trained them."""
    archive = Archive(run_dir, run_id)
    for _, msg in bus.iter_all_events(r, run_id):
        if not isinstance(msg, StepCommitted):
            continue
        raw = fetch_rollouts(r, archive, msg.entry_ids)
        for entry_id in msg.entry_ids:
            if entry_id not in raw:
                raise ArchiveError(f"step {msg.step} trained rollouts entry {entry_id}, which is in neither the "
                                   f"stream nor the archive {archive.dir}: restore the missing archive segment")
            try:
                sample = decode(raw[entry_id], expect=RolloutRecord)
            except DecodeError as exc:
                raise ArchiveError(f"step {msg.step}: entry {entry_id} does not decode ({exc})") from None
            yield sample_line(msg, entry_id, sample)


def export_run(r: redis.Redis, run_id: str, run_dir: Path, out: Path) -> int:
    """Write the export to ``out`` (atomically); return the number of samples."""
    tmp, n = out.with_name(f".{out.name}.tmp"), 0
    try:
        with open(tmp, "w") as f:
            for line in export_lines(r, run_id, run_dir):
                f.write(json.dumps(line) + "\n")
                n += 1
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n


def export_main(run: str | None, log_path: str, out: str) -> int:
    from rlstream.ops.status import opened_run

    with opened_run(run, log_path) as (run_dir, cfg, r):
        n = export_run(r, cfg.run_id, run_dir, Path(out))
    print(f"exported {n} trained samples of run {cfg.run_id} to {out}")
    return 0
