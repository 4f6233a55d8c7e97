"""Metrics: flat dicts with slash names, one JSON object per optimizer step in
``metrics.jsonl``; the run summary ``rlstream up`` prints last."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rlstream.core.disk import run_dir_needs, space_guard


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, metrics: dict[str, Any]) -> None:
        """Append one line, whole or not at all: a full disk truncates a torn line away (every
        reader parses each line) and raises ``DiskFull``."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        data = (json.dumps(clean, sort_keys=True) + "\n").encode()
        with space_guard(self.path, "metrics", needed=lambda: run_dir_needs(self.path.parent)):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                start = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                except OSError:
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)


def read_metrics(path: str | Path, evaluations: bool = False) -> list[dict[str, Any]]:
    """The per-step lines of ``metrics.jsonl`` (or, with ``evaluations``, the evaluation
    lines: those carrying ``eval/version``)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if ("eval/version" in r) == evaluations]


def summary_line(rows: list[dict[str, Any]], wall_s: float) -> str:
    rewards = [r.get("rollout/reward_mean") for r in rows if r.get("rollout/reward_mean") is not None]
    first = sum(rewards[:10]) / len(rewards[:10]) if rewards else float("nan")
    last = sum(rewards[-10:]) / len(rewards[-10:]) if rewards else float("nan")
    version = rows[-1]["version"] if rows else 0
    return (f"summary: steps={len(rows)} final_version={version} reward_first10={first:.3f} "
            f"reward_last10={last:.3f} wall={wall_s:.1f}s")
