"""Resolving user code named as ``"module:function"`` (rollout factories, rewards,
advantages, filters). Worker and trainer processes import it by name, so it must live in
an importable module, unless ``rlstream.main`` holds it for the processes it forks
(``"__script__:<name>"``); errors say exactly what to fix."""
from __future__ import annotations

import importlib
import re
from typing import Any, Callable

_SPEC_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
# "__script__:<name>" names a function held by the script that called rlstream.main (a lambda, a
# function of its __main__): only that process and the trainer and workers it forks have it
# (docs/design.md §15.61 Script hooks run in a forked trainer).
SCRIPT_MODULE = "__script__"
_script_functions: dict[str, Callable[..., Any]] = {}


def hold_script_functions(functions: dict[str, Callable[..., Any]]) -> None:
    """Replace the hooks this process holds for ``"__script__:<name>"`` specs."""
    _script_functions.clear()
    _script_functions.update(functions)


def script_functions() -> dict[str, Callable[..., Any]]:
    return dict(_script_functions)


def check_spec(spec: str, what: str, builtin: tuple[str, ...] = ()) -> str:
    """``spec`` when it looks like ``"module:function"``; ``builtin`` (the names the field
    also accepts) goes into the error, since a misspelt built-in name lands here too."""
    if not _SPEC_RE.fullmatch(spec):
        alternative = f" (or be one of the built-in {', '.join(builtin)})" if builtin else ""
        raise ValueError(f"{what} {spec!r} must look like 'package.module:function'{alternative}")
    return spec


def import_object(spec: str, what: str = "object") -> Callable[..., Any]:
    """Import ``"pkg.module:attr"``; raise ValueError naming the spec and the fix."""
    module_name, _, attr = check_spec(spec, what).partition(":")
    if module_name == SCRIPT_MODULE:
        if attr not in _script_functions:
            where = (" (`rlstream worker`, a worker on another machine, `rlstream up config.json`)"
                     if attr == "rollout_fn_factory" else "")
            raise ValueError(f"{what} {spec!r} is a function held by the script that called rlstream.main (a lambda "
                             "or a function of its __main__); only the processes that script starts are forked with "
                             f"it: a process started by hand{where} cannot import it. Move the function into an "
                             "importable module (e.g. rollout.py next to the script) to name it here")
        return _script_functions[attr]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc}); "
                         "make it importable (on PYTHONPATH or installed) in every process") from None
    except Exception as exc:  # the module itself is broken (SyntaxError, an error at import time)
        raise ValueError(f"{what} {spec!r}: importing module {module_name!r} failed: "
                         f"{type(exc).__name__}: {exc}; fix that module") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r} is not callable")
    return obj
