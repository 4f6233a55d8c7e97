"""``rlstream dead [RUN]``: list a run's dead-letter stream (``rl:{run}:dead``).

One line per entry: ``<dead entry id>  <source stream id>  <reason>`` (the reason folded
onto one line), then ``dead_letters: N``. An entry that is not a decodable
``DeadLetter`` prints ``?`` as its source id and ``undecodable dead letter: <why>`` as
its reason. Exit code 0 (listing is not a check; ``rlstream audit`` is).
Like ``status``, it starts a finished run's embedded redis-server from its AOF.
"""
from __future__ import annotations

import redis

from rlstream.core import keys
from rlstream.core.bus import xrange_all
from rlstream.core.messages import DeadLetter
from rlstream.ops.audit import decode_all


def dead_lines(r: redis.Redis, run_id: str) -> list[str]:
    good, bad = decode_all(xrange_all(r, keys.dead(run_id)), expect=DeadLetter)
    rows = [(entry_id, msg.source_id, msg.reason) for entry_id, msg in good]
    rows += [(entry_id, "?", f"undecodable dead letter: {why}") for entry_id, why in bad]
    rows.sort(key=lambda row: tuple(int(p) for p in row[0].split("-")))
    lines = [f"{entry_id}  {source_id}  {' '.join(reason.split())}" for entry_id, source_id, reason in rows]
    lines.append(f"dead_letters: {len(rows)}")
    return lines


def dead_main(run: str | None, log_path: str) -> int:
    from rlstream.ops.status import opened_run

    with opened_run(run, log_path) as (_, cfg, r):
        lines = dead_lines(r, cfg.run_id)
    for line in lines:
        print(line)
    return 0
