"""Hand-computed learning-rate multipliers (trainer.schedule.lr_multiplier)."""
from __future__ import annotations

import pytest

from rlstream.trainer.schedule import lr_multiplier


def mult(step: int, schedule: str, warmup: int = 0, total: int | None = 12) -> float:
    return lr_multiplier(step, schedule=schedule, warmup_steps=warmup, total_steps=total)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_is_linear_from_one_over_warmup_plus_one(schedule):
    # warmup 3: (step + 1)/4 for steps 0, 1, 2, then the schedule starts at its peak 1.0.
    assert [mult(s, schedule, warmup=3) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_constant():
    assert [mult(s, "constant", total=None) for s in (0, 5, 10_000)] == [1.0, 1.0, 1.0]


def test_linear_decays_to_zero_at_total_steps():
    # warmup 2, total 12: progress (step - 2)/10 -> 1 - progress, held at 0 past the end.
    steps = [2, 4, 7, 11, 12, 20]
    assert [mult(s, "linear", warmup=2) for s in steps] == pytest.approx([1.0, 0.8, 0.5, 0.1, 0.0, 0.0])


def test_cosine_decays_to_zero_at_total_steps():
    # warmup 2, total 12: 0.5·(1 + cos(π·progress)) ; progress 0.2 -> 0.5·(1 + 0.8090170) = 0.9045085,
    # 0.5 -> 0.5, 0.7 -> 0.5·(1 - 0.5877853) = 0.2061074, 1 -> 0 (and held there).
    steps = [2, 4, 7, 9, 12, 20]
    assert [mult(s, "cosine", warmup=2) for s in steps] == pytest.approx(
        [1.0, 0.9045085, 0.5, 0.2061074, 0.0, 0.0], abs=1e-7)


def test_no_warmup_starts_at_full_rate():
    assert mult(0, "linear") == 1.0 and mult(0, "cosine") == 1.0
    assert mult(6, "linear") == pytest.approx(0.5)  # 1 - 6/12


def test_decay_without_total_steps_or_unknown_schedule_is_an_error():
    with pytest.raises(ValueError, match="needs max_steps"):
        mult(0, "linear", total=None)
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        mult(0, "step")
