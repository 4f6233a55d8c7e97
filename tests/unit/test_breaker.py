"""The circuit breaker's rule (workers/breaker.py, docs/design.md §15.31 The circuit breaker
judges rows, not draws): it trips on failed groups spread over many rows, never on one
poison row, however often that row comes back."""
from __future__ import annotations

import itertools

from rlstream.workers.breaker import MIN_ROWS, WINDOW, CircuitBreaker


def test_one_poison_row_never_trips_it():
    b = CircuitBreaker()
    for _ in range(1000):
        b.record(ok=False, row=17, error="ValueError: bad row")
        assert not b.tripped


def test_a_few_poison_rows_never_trip_it_even_back_to_back():
    b = CircuitBreaker()
    for row in itertools.islice(itertools.cycle(range(MIN_ROWS - 1)), 500):
        b.record(ok=False, row=row, error="x")
        assert not b.tripped


def test_failures_on_five_rows_in_a_row_trip_it_and_the_reason_names_the_last_error():
    b = CircuitBreaker()
    for row in range(MIN_ROWS - 1):
        b.record(ok=False, row=row, error="x")
        assert not b.tripped
    b.record(ok=False, row=41, error="ConnectionError: tool server down")
    assert b.tripped
    reason = b.reason()
    assert f"{MIN_ROWS} prompt groups in a row" in reason and f"on {MIN_ROWS} different rows" in reason
    assert "last error (row 41): ConnectionError: tool server down" in reason


def test_a_sampled_group_breaks_the_streak():
    b = CircuitBreaker()
    for row in range(MIN_ROWS - 1):
        b.record(ok=False, row=row, error="x")
    b.record(ok=True, row=99)
    b.record(ok=False, row=50, error="x")
    assert not b.tripped


def test_a_repeated_row_inside_the_streak_counts_once():
    b = CircuitBreaker()
    for row in (1, 2, 3, 3, 3, 4, 1):
        b.record(ok=False, row=row, error="x")
    assert not b.tripped  # 7 failed groups in a row, 4 rows
    b.record(ok=False, row=5, error="x")
    assert b.tripped
    assert "8 prompt groups in a row on this worker could not be sampled, on 5 different rows" in b.reason()


def test_half_of_a_full_window_failing_on_many_rows_trips_it():
    b = CircuitBreaker()
    outcomes = [(i % 2 == 0, i) for i in range(WINDOW - 1)]  # alternating: no streak
    for ok, row in outcomes:
        b.record(ok=ok, row=row, error="x")
        assert not b.tripped
    b.record(ok=False, row=WINDOW, error="x")
    assert b.tripped and f"{WINDOW // 2} of the last {WINDOW}" in b.reason()


def test_below_half_of_the_window_never_trips_it():
    b = CircuitBreaker()
    for i in range(10 * WINDOW):  # 1 group in 3 fails, each on its own row
        b.record(ok=i % 3 != 0, row=i, error="x")
        assert not b.tripped
