"""Bounded polling for tests that wait on the cluster to converge."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(observe: Callable[[], T | None], timeout: float = 30.0, what: str | Callable[[], str] = "condition") -> T:
    """Call ``observe`` until it returns something truthy; fail with ``what`` and the last value on timeout.
    ``what`` may be a callable, evaluated only then (e.g. to attach a process's log tail)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = observe()
        if last:
            return last
        time.sleep(0.2)
    described = what() if callable(what) else what
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {described}; last observed: {last!r}")
