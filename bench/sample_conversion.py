"""The worker's CPU per sample for the user's RolloutSample dataclass (docs/design.md §15.88
RolloutSample is the user's dataclass, the wire record is the codec's): what a rollout_fn's
return costs before it is encoded, side by side in alternating rounds:

- ``record``: ``RolloutRecord(tokens=..., ...)`` from lists, the pydantic construction a
  rollout_fn paid when the wire message was the user's type (less its positional ``__init__``
  wrapper, now gone: the baseline is, if anything, a little fast);
- ``dataclass``: ``to_record(RolloutSample(...))``, building the dataclass in the rollout and
  converting it in the worker (what a draw costs now);

each also with the worker's stamp (``model_copy``) and ``encode``, the rest of a sample's way to
XADD, for scale. Medians over rounds of microseconds per sample, at a few lengths.

    python bench/sample_conversion.py [--tokens 128 1024 4096] [--rounds 7] [--number 2000]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import timeit
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlstream.core.codec import encode  # noqa: E402
from rlstream.core.messages import RolloutRecord  # noqa: E402
from rlstream.core.rollout import RolloutSample, to_record  # noqa: E402

STAMP = dict(sample_id="e0-r3-a0-m1", group_id="e0-r3-a0", group_size=8, row_index=3, submit_version=4,
             min_version=4, max_version=4, worker_id="w1", started_at=1.5, finished_at=2.5)


def fields(n_tokens: int) -> dict:
    """A sample of ``n_tokens`` tokens as a rollout builds it: lists, a quarter of them prompt."""
    prompt = n_tokens // 4
    return dict(tokens=[(7 * i) % 32000 for i in range(n_tokens)],
                logprobs=[0.0] * prompt + [-0.5 - (i % 7) / 10 for i in range(n_tokens - prompt)],
                loss_mask=[0] * prompt + [1] * (n_tokens - prompt), reward=1.0, finish_reason="stop", text="x" * 64)


def variants(f: dict) -> dict:
    return {
        "record": lambda: RolloutRecord(**f),
        "dataclass": lambda: to_record(RolloutSample(**f)),
        "record + stamp + encode": lambda: encode(RolloutRecord(**f).model_copy(update=STAMP)),
        "dataclass + stamp + encode": lambda: encode(to_record(RolloutSample(**f)).model_copy(update=STAMP)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 1024, 4096])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--number", type=int, default=2000, help="calls per timing (fewer for long samples)")
    args = ap.parse_args()
    print(f"# {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC  {platform.machine()}  cpus {os.cpu_count()}  "
          f"load avg {os.getloadavg()[0]:.2f} at start  Python {platform.python_version()}")
    rows = []
    for n in args.tokens:
        timed = variants(fields(n))
        number = max(50, args.number * 1024 // max(n, 1024))
        us: dict[str, list[float]] = {name: [] for name in timed}
        for round_ in range(args.rounds):
            order = list(timed) if round_ % 2 == 0 else list(reversed(timed))  # alternating: drift hits both
            for name in order:
                us[name].append(timeit.timeit(timed[name], number=number) / number * 1e6)
        med = {name: statistics.median(v) for name, v in us.items()}
        rows.append((n, med))
    print("\n| tokens | record (us) | dataclass + to_record (us) | ratio | "
          "record + stamp + encode (us) | dataclass + stamp + encode (us) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n, m in rows:
        a, b = m["record"], m["dataclass"]
        c, d = m["record + stamp + encode"], m["dataclass + stamp + encode"]
        print(f"| {n} | {a:.1f} | {b:.1f} | {b / a:.2f} | {c:.1f} | {d:.1f} | {d / c:.2f} |")


if __name__ == "__main__":
    main()
