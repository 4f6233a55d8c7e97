"""``rlstream.main``: the Fireworks cookbook's recipe entry point, on your hardware.

    from rlstream import Config, main
    result = main(cfg, rollout_fn_factory=make_rollout_fn, rows=rows)

It runs the whole pipeline exactly like ``rlstream up`` (child processes, Redis streams).
Worker and trainer processes import user functions by name, so each must be a
module-level function of an importable module (or a ``"module:function"`` string).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from rlstream.core.config import Config, new_run_id
from rlstream.core.errors import ConfigError, RunFailed
from rlstream.core.imports import check_spec, import_object


@dataclass(frozen=True)
class RunResult:
    run_id: str
    run_dir: Path
    steps: int
    version: int
    metrics: list[dict[str, Any]]  # one per optimizer step (metrics.jsonl)


def importable_spec(fn: Callable | str, what: str) -> str:
    """``"module:function"`` for a user function, or a ConfigError saying how to fix it."""
    if isinstance(fn, str):
        spec = check_spec(fn, what)
    else:
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
        if module in (None, "__main__"):
            raise ConfigError(
                f"{what} {qualname or fn!r} is defined in the script being run (__main__): worker and trainer "
                "processes cannot import it. Move it into a module next to your script (e.g. rollout.py) "
                f"and import it from there, or pass '{what}=\"module:function\"'")
        if "<lambda>" in qualname or "<locals>" in qualname:
            raise ConfigError(f"{what} {module}.{qualname} is a lambda or a nested function: worker and trainer "
                              "processes cannot import it; define it at module level")
        spec = f"{module}:{qualname}"
    try:
        import_object(spec, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return spec


def _write_rows(rows: Iterable[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ConfigError(f"rows[{i}] must be a dict, got {type(row).__name__}")
            f.write(json.dumps(row) + "\n")


def main(
    cfg: Config,
    *,
    rollout_fn_factory: Callable | str | None = None,
    rows: Iterable[dict[str, Any]] | None = None,
    dynamic_filter_fn: Callable | str | None = None,
    evaluation_fn: Callable | str | None = None,
    evaluation_interval: int = 1,
) -> RunResult:
    """Run the pipeline to the end; raise ``RunFailed`` when it fails."""
    from rlstream.core.config import validate_config
    from rlstream.core.metrics import read_metrics
    from rlstream.launcher import up

    updates: dict[str, Any] = {"run_id": cfg.run_id or new_run_id(), "evaluation_interval": evaluation_interval}
    for name, fn in (("rollout_fn_factory", rollout_fn_factory), ("dynamic_filter_fn", dynamic_filter_fn),
                     ("evaluation_fn", evaluation_fn)):
        if fn is not None:
            updates[name] = importable_spec(fn, name)
    run_dir = Path(cfg.log_path) / updates["run_id"]
    if rows is not None:
        _write_rows(rows, run_dir / "dataset.jsonl")
        updates["dataset"] = str(run_dir / "dataset.jsonl")
    cfg = validate_config({**cfg.model_dump(mode="json", context={"secrets": True}), **updates})
    code = up(cfg)
    if code != 0:
        raise RunFailed(f"run {cfg.run_id} failed (exit {code}); logs in {run_dir / 'logs'}")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    return RunResult(cfg.run_id, run_dir, len(metrics), metrics[-1]["version"] if metrics else 0, metrics)
