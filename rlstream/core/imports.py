"""Resolving user code named as ``"module:function"`` (rollout factories, rewards,
advantages, filters). Worker and trainer processes import it by name, so it must live in
an importable module; errors say exactly what to fix."""
from __future__ import annotations

import importlib
import re
from typing import Any, Callable

_SPEC_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


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
