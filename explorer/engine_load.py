"""Which engine of a group takes the next request: least outstanding across the whole job, down engines last.

Every runner lives in its own Ray actor process with its own HTTP clients, so no runner sees the job's load. The
scheduler does: it keeps one ``EngineLoad`` for the rollout group, picks an engine for every sub-task it dispatches
and releases it when the sub-task returns. The runner tries the scheduler's order (skipping engines it saw fail) and
reports the engines that failed, which the scheduler then avoids for ``RETRY_DOWN_AFTER`` seconds. Ties between
equally loaded engines rotate, so an idle job does not pile its first requests onto engine 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

RETRY_DOWN_AFTER = 10.0  # seconds an engine that failed is tried only after every healthy one


def build_order(outstanding: Sequence[int], down: Sequence[bool], start: int = 0) -> list[int]:
    """Engine indices in the order to try: healthy first, then fewest outstanding, ties from ``start`` onwards."""
    size = len(outstanding)
    if len(down) != size:
        raise ValueError(f"{size} outstanding counts but {len(down)} down flags")
    return sorted(range(size), key=lambda i: (down[i], outstanding[i], (i - start) % size))


class EngineLoad:
    """The scheduler's load picture of one engine group: requests in flight per engine and engines seen failing."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError("an engine group needs at least one engine")
        self.outstanding = [0] * size
        self.dispatched = [0] * size  # sub-tasks ever assigned to each engine (for metrics and benchmarks)
        self.down_until = [-math.inf] * size
        self.serving = [True] * size  # at the job's policy version (``set_serving``): the only ones dispatched to
        self.versions: list[str | None] | None = None  # what each engine serves, once the explorer knows
        self._next = 0  # where ties start: the engine after the last one chosen

    def down(self, now: float) -> list[bool]:
        return [now < until for until in self.down_until]

    def set_serving(self, serving: Sequence[bool], versions: Sequence[str | None] | None = None) -> None:
        """Which engines serve the job's current policy version (the others leave the rotation until they do), and
        the version each serves (recorded on the experiences it produces)."""
        if len(serving) != len(self.serving) or (versions is not None and len(versions) != len(serving)):
            raise ValueError(f"{len(self.serving)} engines but {len(serving)} serving flags")
        self.serving = list(serving)
        self.versions = list(versions) if versions is not None else None

    def resize(self, size: int, serving: bool) -> None:
        """Follow the group's membership: counts of the engines that stay are kept, removed ones forgotten; added
        ones start with nothing outstanding and ``serving`` (false: out of the rotation until the explorer finds them
        at the job's version)."""
        if size < 1:
            raise ValueError("an engine group needs at least one engine")
        grow = max(0, size - len(self.outstanding))
        self.outstanding = self.outstanding[:size] + [0] * grow
        self.dispatched = self.dispatched[:size] + [0] * grow
        self.down_until = self.down_until[:size] + [-math.inf] * grow
        self.serving = self.serving[:size] + [serving] * grow
        if self.versions is not None:
            self.versions = self.versions[:size] + [None] * grow
        self._next %= size

    def acquire(self, now: float) -> tuple[int, ...]:
        """Choose an engine for one request (the first of the returned order) and count it as outstanding.

        The order holds only engines at the current version; when none is (every engine restarted, say), all of
        them, so exploring goes on and each experience carries the version its engine reports."""
        order = build_order(self.outstanding, self.down(now), self._next)
        order = [i for i in order if self.serving[i]] or order
        chosen = order[0]
        self.outstanding[chosen] += 1
        self.dispatched[chosen] += 1
        self._next = (chosen + 1) % len(self.outstanding)
        return tuple(order)

    def release(self, index: int) -> None:
        self.outstanding[index] = max(0, self.outstanding[index] - 1)

    def mark_down(self, indices: Iterable[int], now: float) -> None:
        """Engines a runner could not reach: tried last until ``RETRY_DOWN_AFTER`` seconds from ``now``."""
        for index in indices:
            if 0 <= index < len(self.down_until):
                self.down_until[index] = now + RETRY_DOWN_AFTER
