"""Live progress of a run: a rich table on a TTY, plain log lines otherwise."""
from __future__ import annotations

import time
from typing import TextIO

from rlstream.core import bus, keys
from rlstream.core.config import Config
from rlstream.core.run_state import RunState

PLAIN_EVERY_S = 5.0


def buffered_samples(r, run_id: str) -> int:
    """Samples written but not yet trained: the trainer's pending entries plus those not
    yet delivered (``lag``; Redis 6.2 does not report it, so only pending counts there)."""
    info = bus.group_info(r, keys.rollouts(run_id))
    return info["pending"] + int(info["lag"] or 0)


class Progress:
    def __init__(self, cfg: Config, out: TextIO):
        self.cfg, self.out = cfg, out
        self.tty = out.isatty()
        self.live = None
        self.t0 = time.monotonic()
        self.last_plain = 0.0
        self.last_step = -1

    def __enter__(self) -> Progress:
        if self.tty:
            from rich.live import Live

            self.live = Live(refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def snapshot(self, state: RunState, r) -> dict[str, float | int | str]:
        m = state.last_step.metrics if state.last_step else {}
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        samples = state.trained_samples
        return {
            "step": state.steps, "max_steps": self.cfg.max_steps or "-", "version": state.published_version,
            "reward": m.get("rollout/reward_mean", float("nan")), "samples/s": samples / elapsed,
            "lag": buffered_samples(r, self.cfg.run_id),
            "in_flight_groups": len(state.open_groups), "offset_max": m.get("async/version_offset_max", 0),
            "elapsed": elapsed,
        }

    def update(self, state: RunState, r) -> None:
        s = self.snapshot(state, r)
        if self.live is not None:
            from rich.table import Table

            table = Table(title=f"rlstream run {self.cfg.run_id}", show_header=True)
            for header in ("step", "version", "reward", "samples/s", "lag", "in flight", "offset", "time"):
                table.add_column(header, justify="right")
            table.add_row(f"{s['step']}/{s['max_steps']}", str(s["version"]), f"{s['reward']:.3f}",
                          f"{s['samples/s']:.0f}", str(s["lag"]), f"{s['in_flight_groups']} groups",
                          f"≤{s['offset_max']:.0f}", f"{s['elapsed']:.0f}s")
            self.live.update(table)
        elif s["step"] != self.last_step and time.monotonic() - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain, self.last_step = time.monotonic(), s["step"]
            print("progress: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in s.items()), file=self.out, flush=True)
