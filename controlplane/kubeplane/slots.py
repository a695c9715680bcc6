"""One network slot per running plane with real nodes, held by an flock that dies with its launcher."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from kubeplane import netplan


class NoFreeSlotError(RuntimeError):
    """Every slot is held by a running launcher."""


@dataclasses.dataclass
class SlotLock:
    slot: int
    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def lock_path(slot: int) -> Path:
    return Path(tempfile.gettempdir()) / f"kubeplane-slot-{slot}.lock"


def try_lock(path: Path) -> int | None:
    """An exclusive flock on ``path`` (the open fd; closing it, or the process dying, releases it), or None."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def acquire(clean_stale: Callable[[int], None]) -> SlotLock:
    """The first slot no live launcher holds; what a dead holder left in it (its bridge) is cleaned first."""
    for slot in range(netplan.MAX_SLOTS):
        fd = try_lock(lock_path(slot))
        if fd is None:
            continue
        clean_stale(slot)
        return SlotLock(slot, fd)
    raise NoFreeSlotError(f"all {netplan.MAX_SLOTS} real-node network slots are in use")
