"""What a worker checks, and how it words a group it cannot sample: samples before they
leave (the trainer's checks, caught early), a built-in rollout's prompt before drawing,
and the rejection reason a group gets from its last failed draw (docs/design.md §15.31
The circuit breaker judges rows, not draws)."""
from __future__ import annotations

from collections import Counter
from typing import Any

from rlstream.core.messages import RolloutRecord
from rlstream.core.rollout import InvalidSample, RolloutSample, no_room, to_record

ERROR_WIDTH = 200  # characters of an exception's text kept in a rejection reason


def checked_record(result: Any, vocab_size: int | None, max_seq_len: int) -> RolloutRecord:
    """The wire record of what ``rollout_fn`` returned, checked as the trainer will check it;
    ``InvalidSample`` says why the trainer would dead-letter it. Caught here so that it is
    redrawn now instead of leaving its group waiting 2 x job_timeout in the trainer."""
    if not isinstance(result, RolloutSample):
        kind = type(result)
        name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        hint = " (another class of that name: import RolloutSample from rlstream)" \
            if kind.__name__ == "RolloutSample" else ""
        raise TypeError(f"rollout_fn must return rlstream.RolloutSample or None, got {name}{hint}")
    record = to_record(result)
    try:
        record.check_limits(vocab_size, max_seq_len)
    except ValueError as exc:
        raise InvalidSample(str(exc)) from None
    return record


def prompt_problem(ids: list[int], vocab_size: int | None, max_seq_len: int) -> str | None:
    """Why no draw of this prompt can succeed, or None: checked once before drawing, so a
    bad row costs its group at once instead of G failed draws (and no breaker count)."""
    if not ids:
        return "the prompt has no tokens"
    if len(ids) >= max_seq_len:
        return str(no_room(len(ids), max_seq_len))
    if min(ids) < 0:
        return f"token id {min(ids)} < 0"
    if vocab_size is not None and max(ids) >= vocab_size:
        return f"token id {max(ids)} >= vocab size {vocab_size}"
    return None


def error_text(exc: BaseException) -> str:
    """``Type: message`` on one line, short enough for a rejection reason."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:ERROR_WIDTH]


def group_rejection(valid: int, group_size: int, min_group_size: int, last_error: str) -> str | None:
    """Why a group with ``valid`` samples is rejected (None: it is emitted). The last
    failure's text leads, so that ``rlstream audit`` (which shows 80 characters) shows it."""
    if valid >= min_group_size:  # (a single survivor has no group-relative advantage)
        return None
    shortfall = f"only {valid} of {group_size} draws returned a valid sample"
    return f"{last_error} ({shortfall})" if last_error else shortfall


class DrawTally:
    """One job's failed draws: counts (written run-wide) and the last error (the reason
    the group is rejected with, and what the circuit breaker reports)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.last_error = ""

    def fail(self, field: str, error: str) -> None:
        self.counts[field] += 1
        self.last_error = error[:ERROR_WIDTH]

    @property
    def failed(self) -> bool:
        return sum(self.counts.values()) > 0
