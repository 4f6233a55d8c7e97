"""Rows for the producer: the built-in task, or a JSONL file.

For the built-in rollout, a JSONL row is an object with one of ``prompt`` (str, optional
``answer``), ``messages`` (OpenAI chat format) or ``prompt_token_ids`` (list of ints). A row
the loader cannot use is reported with its line number before anything is enqueued; that
includes a ``prompt_token_ids`` row with no room to generate under ``max_seq_len``. Rows
with text need the tokenizer, which only workers load: a worker checks them before drawing
(docs/design.md §15.31 The circuit breaker judges rows, not draws). With a user's
``rollout_fn_factory`` the rollout decides what a row means, so any JSON object is a row.
Rows past ``max_rows`` are not used, and the loader logs how many there were.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from rlstream.builtin.task import builtin_rows
from rlstream.core.config import Config
from rlstream.core.errors import ConfigError

log = logging.getLogger(__name__)
PROMPT_KEYS = ("prompt", "messages", "prompt_token_ids")


def _check_row(row: Any, where: str, max_seq_len: int | None = None, any_object: bool = False) -> dict[str, Any]:
    """``row`` when the rollout can use it: any object for a user's rollout (``any_object``),
    one the built-in rollout can prompt with otherwise."""
    if not isinstance(row, dict):
        raise ConfigError(f"dataset error: {where}: a row must be a JSON object, got {type(row).__name__}")
    if any_object:
        return row
    if not any(k in row for k in PROMPT_KEYS):
        raise ConfigError(f"dataset error: {where}: a row needs one of {', '.join(PROMPT_KEYS)}")
    if "prompt" in row and not isinstance(row["prompt"], str):
        raise ConfigError(f"dataset error: {where}: 'prompt' must be a string")
    if "prompt_token_ids" in row and not (
        isinstance(row["prompt_token_ids"], list) and row["prompt_token_ids"]
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in row["prompt_token_ids"])
    ):
        raise ConfigError(f"dataset error: {where}: 'prompt_token_ids' must be a non-empty list of ids >= 0")
    if "prompt_token_ids" in row and max_seq_len is not None and len(row["prompt_token_ids"]) >= max_seq_len:
        raise ConfigError(f"dataset error: {where}: 'prompt_token_ids' has {len(row['prompt_token_ids'])} ids, which "
                          f"leaves no room to generate under max_seq_len {max_seq_len}; shorten or drop the row, or "
                          "raise max_seq_len")
    if "messages" in row and not (
        isinstance(row["messages"], list)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in row["messages"])
    ):
        raise ConfigError(f"dataset error: {where}: 'messages' must be a list of {{role, content}} objects")
    return row


def load_jsonl(path: str | Path, max_rows: int, max_seq_len: int | None = None, *,
               any_object: bool = False) -> list[dict[str, Any]]:
    """The first ``max_rows`` rows of ``path``, each checked (``_check_row``); the number of
    rows after them, which are not used, is logged."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset error: file {str(path)!r} does not exist")
    rows: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if len(rows) >= max_rows:
                dropped = 1 + sum(1 for rest in f if rest.strip())  # not parsed: only counted
                log.warning("dataset %s: using its first %d rows (max_rows); the %d row(s) after them are not used",
                            path, max_rows, dropped)
                break
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else f"not UTF-8: {exc.reason}"
                raise ConfigError(f"dataset error: {path}:{lineno}: not JSON ({reason})") from None
            rows.append(_check_row(row, f"{path}:{lineno}", max_seq_len, any_object))
    if not rows:
        raise ConfigError(f"dataset error: {path} has no rows")
    return rows


def load_rows(cfg: Config) -> list[dict[str, Any]]:
    """The run's rows: the built-in task's, or the dataset's (any JSON object when a user's
    rollout_fn_factory reads them)."""
    if cfg.dataset is None:
        return list(builtin_rows(cfg.max_rows, cfg.seed))
    return load_jsonl(cfg.dataset, cfg.max_rows, cfg.max_seq_len, any_object=cfg.rollout_fn_factory is not None)


def epoch_order(n_rows: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Row indices in the order epoch ``epoch`` visits them (deterministic: restartable)."""
    order = list(range(n_rows))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order
