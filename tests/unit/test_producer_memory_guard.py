"""The producer's back-pressure (docs/design.md §15.48 A memory guard before Redis refuses
writes): past the high-water mark it admits nothing; below it, it admits as the gate allows."""
from __future__ import annotations

import threading

import pytest
from factories import legacy_config
from polling import wait_until

from rlstream.core import bus, keys, memory_guard
from rlstream.core.messages import GroupAdmitted, RunFinished
from rlstream.producers.producer import run_producer


def run_until_checked(r, tmp_path, monkeypatch, fraction: float | None) -> list[GroupAdmitted]:
    """Run the producer with Redis at ``fraction`` of its maxmemory until it has asked twice,
    then end the run; the groups it admitted."""
    asked = []
    def pressure(r_, high_water: float) -> float | None:
        asked.append(1)
        return fraction if fraction is not None and fraction >= high_water else None
    monkeypatch.setattr(memory_guard, "memory_pressure", pressure)
    cfg = legacy_config(run_id="mg", log_path=str(tmp_path), max_rows=8, completions_per_prompt=2,
                        prompt_groups_per_step=1, max_head_offpolicy_versions=0)
    thread = threading.Thread(target=run_producer, args=(cfg, r), daemon=True)
    thread.start()
    wait_until(lambda: len(asked) >= 2, 30, "the producer's second memory check")
    bus.xadd(r, keys.events("mg"), RunFinished(reason="test", step=0, version=0))
    thread.join(30)
    assert not thread.is_alive()
    return [m for _, m in bus.iter_all_events(r, "mg") if isinstance(m, GroupAdmitted)]


@pytest.mark.parametrize("fraction, admits", [(0.95, False), (0.5, True), (None, True)])
def test_admission_pauses_past_the_high_water_mark(r, tmp_path, monkeypatch, fraction, admits):
    admitted = run_until_checked(r, tmp_path, monkeypatch, fraction)
    assert bool(admitted) == admits, admitted
