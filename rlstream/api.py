"""``rlstream.main``: the Fireworks cookbook's recipe entry point, on your hardware.

    from rlstream import Config, main
    result = main(cfg, rollout_fn_factory=make_rollout_fn, rows=rows)

It runs the whole pipeline exactly like ``rlstream up`` (child processes, Redis streams),
over ``cfg`` with the ``RLSTREAM_<FIELD>`` environment overrides applied, as ``up`` applies
them over a TOML file. ``rollout_fn_factory`` and the trainer's hooks (``dynamic_filter_fn``,
``evaluation_fn``) may be anything callable, a lambda or a function of the script (its
``__main__``, a notebook cell, a nested function) included: one that cannot be imported by name
is held by this process, and the processes that run it (the workers for the factory, the
trainer for all three) are forked from it instead of exec'd (docs/design.md §15.61 Script
hooks run in a forked trainer). An importable function still goes by name. Workers started
elsewhere (``rlstream worker``, another machine) import the factory by name, so a run that
relies on them (``workers.count = 0``) needs an importable factory.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from rlstream.core.config import Config, env_overrides, new_run_id, set_path
from rlstream.core.errors import ConfigError, RunFailed
from rlstream.core.imports import SCRIPT_MODULE, check_spec, hold_script_functions, import_object


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
                f"{what} {qualname or fn!r} is defined in the script being run (__main__): it runs in the rollout "
                "worker processes, which import it by name. Move it into a module next to your script (e.g. "
                f"rollout.py) and import it from there, or pass '{what}=\"module:function\"'")
        if "<lambda>" in qualname or "<locals>" in qualname:
            raise ConfigError(f"{what} {module}.{qualname} is a lambda or a nested function: it runs in the rollout "
                              "worker processes, which import it by name; define it at module level of an "
                              "importable module")
        spec = f"{module}:{qualname}"
    try:
        import_object(spec, what)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return spec


def script_function_spec(fn: Callable | str, what: str, held: dict[str, Callable]) -> str:
    """The spec of a user function: by name when a fresh process can import it, else
    ``"__script__:<what>"`` with ``fn`` put in ``held`` (the processes that run it are then
    forked from this one)."""
    if isinstance(fn, str):
        return importable_spec(fn, what)
    if not callable(fn):
        raise ConfigError(f"{what} must be a callable or a 'module:function' string, got {type(fn).__name__}")
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if module not in (None, "__main__") and qualname and "<" not in qualname:
        try:
            if import_object(f"{module}:{qualname}", what) is fn:
                return f"{module}:{qualname}"
        except ValueError:
            pass  # not importable under that name: hold it
    held[what] = fn
    return f"{SCRIPT_MODULE}:{what}"


def held_factory_without_workers(fn: Callable) -> str:
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"
    return (f"config error: rollout_fn_factory {name} is defined in the script (its __main__, a notebook or a nested "
            "function) and workers.count = 0: the workers `rlstream worker` starts (here or on another machine) "
            "import the factory by name, and only workers this script starts are forked with it. Move it into a "
            "module next to your script (e.g. rollout.py) and import it from there, or let this script start the "
            "workers (workers.count >= 1)")


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
    evaluation_interval: int | None = None,
) -> RunResult:
    """Run the pipeline to the end; raise ``RunFailed`` when it fails. ``evaluation_interval``
    overrides ``cfg.evaluation_interval`` only when given."""
    from rlstream.core.config import validate_config
    from rlstream.core.metrics import read_metrics
    from rlstream.launcher import up

    data = cfg.model_dump(mode="json", context={"secrets": True})
    for dotted, value in env_overrides(os.environ):  # as `rlstream up` over a file: the script, then the env
        set_path(data, dotted, value)
    updates: dict[str, Any] = {"run_id": data.get("run_id") or new_run_id()}
    if evaluation_interval is not None:
        updates["evaluation_interval"] = evaluation_interval
    held: dict[str, Callable] = {}
    for name, fn in (("rollout_fn_factory", rollout_fn_factory), ("dynamic_filter_fn", dynamic_filter_fn),
                     ("evaluation_fn", evaluation_fn)):
        if fn is not None:
            updates[name] = script_function_spec(fn, name, held)
    cfg = validate_config({**data, **updates})
    if "rollout_fn_factory" in held and cfg.workers.count == 0:
        raise ConfigError(held_factory_without_workers(rollout_fn_factory))
    run_dir = cfg.run_dir()
    if rows is not None:
        _write_rows(rows, run_dir / "dataset.jsonl")
        cfg = cfg.model_copy(update={"dataset": str(run_dir / "dataset.jsonl")})
    hold_script_functions(held)
    try:
        code = up(cfg)
    finally:
        hold_script_functions({})
    if code != 0:
        raise RunFailed(f"run {cfg.run_id} failed (exit {code}); logs in {run_dir / 'logs'}")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    return RunResult(cfg.run_id, run_dir, len(metrics), metrics[-1]["version"] if metrics else 0, metrics)
