"""Per-attempt timeouts from observed latency (``scheduler.dynamicTimeout``). Pure.

A straggler (a slow engine, a stuck request) holds its runner for ``taskTimeoutSeconds`` when that is the only limit,
and operators set it high so that genuinely long tasks finish. With a dynamic timeout, a task's *first* attempt is
limited to ``factor`` times the ``percentile`` of recent successful attempts of the same kind (rollout or eval), within
``[minSeconds, taskTimeoutSeconds]``, once ``minSamples`` are known; retries get the full ``taskTimeoutSeconds``, so a
task that is simply long is retried once and then completes rather than being cut forever.
"""

from __future__ import annotations

import collections
import math

from explorer.config import DynamicTimeoutSpec


class AttemptTimeouts:
    """Recent successful attempt durations per kind, and the timeout each next attempt gets."""

    def __init__(self, static_seconds: float, spec: DynamicTimeoutSpec | None):
        self.static_seconds = static_seconds
        self.spec = spec
        self._recent: dict[str, collections.deque[float]] = {}

    def observe(self, kind: str, seconds: float) -> None:
        """A successful attempt of ``kind`` took ``seconds``."""
        if self.spec is not None:
            self._recent.setdefault(kind, collections.deque(maxlen=self.spec.window)).append(seconds)

    def percentile(self, kind: str) -> float | None:
        """The spec's percentile of the recent durations (nearest rank), None below ``minSamples``."""
        recent = self._recent.get(kind)
        if self.spec is None or recent is None or len(recent) < self.spec.min_samples:
            return None
        ordered = sorted(recent)
        rank = max(1, math.ceil(self.spec.percentile * len(ordered)))
        return ordered[rank - 1]

    def timeout(self, kind: str, attempt: int) -> float:
        """Seconds attempt ``attempt`` (0: the first) of a ``kind`` task may run."""
        observed = self.percentile(kind)
        if self.spec is None or attempt > 0 or observed is None:
            return self.static_seconds
        return min(self.static_seconds, max(self.spec.min_seconds, self.spec.factor * observed))
