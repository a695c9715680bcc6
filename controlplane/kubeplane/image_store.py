"""Kept containerd image stores for real nodes: importing a 6 GiB runtime image takes minutes, so node ``i`` of
successive planes reuses one store (``<cache>/nodes/node-<i>/containerd``), held by an flock while a plane runs.
A second plane running at the same time gets a fresh store inside its work directory instead."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

from kubeplane import paths, slots


@dataclasses.dataclass
class Store:
    path: Path
    fd: int

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def acquire(index: int) -> Store | None:
    root = paths.cache_dir() / "nodes" / f"node-{index}"
    root.mkdir(parents=True, exist_ok=True)
    fd = slots.try_lock(root / "lock")
    return None if fd is None else Store(root / "containerd", fd)
