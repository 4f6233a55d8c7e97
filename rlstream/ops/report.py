"""``rlstream report RUN``: one self-contained HTML page (PNG plots embedded as data URIs) drawn
from the run directory's ``metrics.jsonl``: the reward curve, the version offsets, rollout
throughput, where each step's wall time went, and the evaluation curves. No Redis needed: it
works on a finished run, a copied run directory or a live run's partial file.

matplotlib is imported here, inside ``render``, so that ``rlstream --help`` and every other
command stay as fast as before it was a dependency.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Callable

from rlstream.core.errors import ConfigError
from rlstream.core.metrics import read_metrics

Rows = list[dict[str, Any]]


def series(rows: Rows, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows that carry ``key`` with a number."""
    pts = [(r["step"], r[key]) for r in rows
           if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    return [p[0] for p in pts], [p[1] for p in pts]


def step_wall_time(r: dict) -> float | None:
    """A line's wall time since the previous one: ``perf/step_time`` in the cookbook's names
    (lines with ``perf/train_time``, since 0.2.0), ``perf/step_wall_time`` before."""
    return r.get("perf/step_time") if "perf/train_time" in r else r.get("perf/step_wall_time")


def step_breakdown(rows: Rows) -> dict[str, list[float]]:
    """Per step: seconds waiting for rollouts, computing (the rest of the step's wall time), and
    writing weights. Runs logged before the wall time existed use the trainer's own
    ``perf/train_wait_time`` and ``perf/step_time`` (then its work, not its wall time)."""
    out: dict[str, list[float]] = {"step": [], "wait for rollouts": [], "compute": [], "write weights": []}
    for r in rows:
        wait = r.get("perf/trainer_wait_for_sampler_time", r.get("perf/train_wait_time"))
        wall = step_wall_time(r)
        if wait is None or (wall is None and r.get("perf/step_time") is None):
            continue
        weights = r.get("perf/weight_update_time", r.get("perf/weight_sync_time", 0.0)) or 0.0
        compute = (wall - wait if wall is not None else r["perf/step_time"]) - weights
        out["step"].append(r["step"])
        out["wait for rollouts"].append(wait)
        out["compute"].append(max(compute, 0.0))
        out["write weights"].append(weights)
    return out


def summary(rows: Rows) -> dict[str, str]:
    def mean(key: str, part: Rows) -> float | None:
        vals = [r[key] for r in part if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    def fmt(v: float | None, spec: str = ".3f") -> str:
        return "n/a" if v is None else format(v, spec)

    timed = [r for r in rows if step_wall_time(r) is not None]
    walls = [step_wall_time(r) for r in timed]
    waits = [r.get("perf/trainer_wait_for_sampler_time") or 0.0 for r in timed]
    return {
        "steps": str(len(rows)), "final version": str(rows[-1]["version"]) if rows else "n/a",
        "reward, first 10 steps": fmt(mean("rollout/reward_mean", rows[:10])),
        "reward, last 10 steps": fmt(mean("rollout/reward_mean", rows[-10:])),
        "mean version offset": fmt(mean("async/version_offset_mean", rows), ".2f"),
        "trainer idle share (waiting for rollouts)": fmt(sum(waits) / sum(walls) if walls and sum(walls) else None,
                                                         ".1%"),
        "mean overlap ratio": fmt(mean("perf/overlap_ratio", rows), ".2f"),
        "rollout samples/s (mean)": fmt(mean("perf/rollout_samples_per_s", rows), ".1f"),
    }


def render(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for the run in ``run_dir``; returns its path."""
    metrics = run_dir / "metrics.jsonl"
    rows, evals = read_metrics(metrics), read_metrics(metrics, evaluations=True)
    if not rows and not evals:
        raise ConfigError(f"no metrics in {metrics}: a run writes a line per step there once it has trained")
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (also on a machine with a display)
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def figure(title: str, draw: Callable[[Any], bool]) -> str | None:
        fig, ax = plt.subplots(figsize=(7.5, 3.2), dpi=100)
        try:
            if not draw(ax):
                return None
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
            fig.tight_layout()
            buf = io.BytesIO()
            fig.savefig(buf, format="png")
            return base64.b64encode(buf.getvalue()).decode()
        finally:
            plt.close(fig)

    def lines(keys: list[str], source: Rows = rows) -> Callable[[Any], bool]:
        def draw(ax) -> bool:
            drawn = False
            for key in keys:
                x, y = series(source, key)
                if x:
                    ax.plot(x, y, marker="." if len(x) < 60 else None, label=key)
                    drawn = True
            return drawn
        return draw

    def breakdown(ax) -> bool:
        parts = step_breakdown(rows)
        if not parts["step"]:
            return False
        bottom = [0.0] * len(parts["step"])
        for name in ("wait for rollouts", "compute", "write weights"):
            ax.bar(parts["step"], parts[name], bottom=bottom, label=name, width=0.9)
            bottom = [b + v for b, v in zip(bottom, parts[name])]
        ax.set_ylabel("seconds")
        return True

    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval/") and k != "eval/version"})
    sections = [
        ("Reward", lines(["rollout/reward_mean", "rollout/accuracy"])),
        ("Version offsets (how many versions behind the trained policy)",
         lines(["async/version_offset_mean", "async/version_offset_max", "async/submit_offset_max"])),
        ("Rollout throughput (samples/s)", lines(["perf/rollout_samples_per_s"])),
        ("Rollout throughput (tokens/s)", lines(["perf/rollout_tokens_per_s"])),
        ("Where each step's wall time went", breakdown),
        ("Evaluation", lines(eval_keys, evals)),
    ]
    body = [f"<h1>rlstream run {html.escape(run_dir.name)}</h1>", "<table>"]
    body += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in summary(rows).items()]
    body.append("</table>")
    for title, draw in sections:
        png = figure(title, draw)
        body.append(f"<h2>{html.escape(title)}</h2>")
        body.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">' if png
                    else "<p>not in this run's metrics</p>")
    out = out or run_dir / "report.html"
    out.write_text("<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>rlstream report</title>"
                   "<style>body{font-family:sans-serif;max-width:60em;margin:auto}th{text-align:left;padding-right:2em}"
                   "</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return out


def report_main(run: str | None, log_path: str, out: str | None = None) -> int:
    from rlstream.ops.status import find_run_dir

    path = render(find_run_dir(run, log_path), Path(out) if out else None)
    print(path)
    return 0
