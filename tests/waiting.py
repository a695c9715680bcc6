"""Bounded polling for tests that wait on the cluster to converge."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(observe: Callable[[], T | None], timeout: float = 30.0, what: str = "condition") -> T:
    """Call ``observe`` until it returns something truthy; fail with ``what`` and the last value on timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = observe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last observed: {last!r}")
