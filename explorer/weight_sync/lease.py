"""Which trainer owns the sync group: one at a time, until it leaves or its lease lapses.

Without an owner two trainers tear down each other's group (each ``POST /v1/sync/group`` closes the previous one).
A trainer names itself on every call (``X-Sync-Trainer``, hostname/pid/random by default); each call renews its
lease, a push in progress holds it, and the lease ends when the trainer leaves, when its push fails (it is most
likely gone) or ``seconds`` after its last call. Pure: the caller passes the clock.
"""

from __future__ import annotations

import dataclasses

HEADER = "X-Sync-Trainer"


class GroupHeldError(RuntimeError):
    """Another trainer owns the group (temporary: retry once it has left or its lease has lapsed)."""

    def __init__(self, holder: str, remaining: float | None):
        until = "its push in progress ends" if remaining is None else f"its lease lapses in {remaining:.0f} s"
        super().__init__(
            f"the sync group is held by trainer {holder!r}; it is free once that trainer closes its client or {until}"
        )
        self.holder = holder


@dataclasses.dataclass
class Lease:
    """The group's owner and when it last called."""

    seconds: float
    holder: str | None = None
    renewed: float = 0.0

    def current(self, now: float, busy: bool = False) -> str | None:
        """The trainer that owns the group now (None: free); ``busy`` (a push in progress) keeps the lease."""
        if self.holder is None or (not busy and now - self.renewed >= self.seconds):
            return None
        return self.holder

    def check(self, trainer: str, now: float, busy: bool = False) -> None:
        """Refuse ``trainer`` while someone else owns the group."""
        holder = self.current(now, busy)
        if holder is not None and holder != trainer:
            raise GroupHeldError(holder, None if busy else self.seconds - (now - self.renewed))

    def claim(self, trainer: str, now: float, busy: bool = False) -> None:
        """``check``, then make ``trainer`` the owner from ``now``."""
        self.check(trainer, now, busy)
        self.holder, self.renewed = trainer, now

    def renew(self, trainer: str, now: float) -> None:
        """Restart ``trainer``'s lease if it still holds one (never takes the group over)."""
        if self.holder == trainer:
            self.renewed = now

    def release(self, trainer: str | None = None) -> bool:
        """End the lease (only ``trainer``'s, when given); True when it ended."""
        if self.holder is None or (trainer is not None and trainer != self.holder):
            return False
        self.holder = None
        return True
