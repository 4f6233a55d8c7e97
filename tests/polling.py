"""Waiting in tests: poll a predicate until it holds or a deadline passes (never a bare
sleep, never a timing assertion). Importable as ``polling`` from every test folder: pytest
puts ``tests/`` on sys.path when it imports ``tests/conftest.py`` (rootdir-based "prepend"
import mode; ``tests/`` has no ``__init__.py``)."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns something truthy, and
    return that; raise AssertionError naming ``what`` once ``timeout`` seconds have passed.
    A predicate may raise itself to give up early (a process it waits on has died)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
