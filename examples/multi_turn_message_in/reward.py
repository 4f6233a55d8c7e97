"""Verifies a GSM8K-style answer: the last number of the assistant's final turn must equal
the number after ``####`` in the reference answer."""
from rlstream.builtin.rewards import final_number


def verify(completion_text: str, reference: str) -> float:
    got, want = final_number(completion_text), final_number(reference)
    return 1.0 if got is not None and want is not None and got == want else 0.0
