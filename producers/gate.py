"""The admission gate (docs/design.md §5 Versions and the gate), as pure functions.

With G completions per prompt, B = P*G samples per step, O = max_head_offpolicy_versions
and C = max in-flight rollouts:

    staleness_capacity   = (published_version + O + 1)*B - (accepted + reserved)
    concurrency_capacity = C - in_flight
    admit the next row  <=>  min(staleness_capacity, concurrency_capacity) >= G

A group admitted while version v is published is one of the first (v+O+1)*B samples, so in
admission order it lands in one of the first v+O+1 batches and is trained by weights at most
O versions newer than the ones it was submitted at. The trainer takes the oldest-submitted
ready groups first, but it does not wait for a group that is still being sampled (only, bounded,
for one the batch is the last allowed to train): one that completes late (a slow or re-dispatched
job) can land a batch later, hence the O + 1 bound docs/algorithms.md states and the learning
test checks.
"""
from __future__ import annotations


def staleness_capacity(published_version: int, offpolicy_versions: int, batch_size: int,
                       accepted_plus_reserved: int) -> int:
    return (published_version + offpolicy_versions + 1) * batch_size - accepted_plus_reserved


def concurrency_capacity(max_in_flight: int | None, in_flight: int) -> float:
    return float("inf") if max_in_flight is None else max_in_flight - in_flight


def can_admit(group_size: int, *, published_version: int, offpolicy_versions: int,
              batch_size: int, accepted_plus_reserved: int, max_in_flight: int | None,
              in_flight: int) -> bool:
    capacity = min(
        staleness_capacity(published_version, offpolicy_versions, batch_size, accepted_plus_reserved),
        concurrency_capacity(max_in_flight, in_flight),
    )
    return capacity >= group_size
