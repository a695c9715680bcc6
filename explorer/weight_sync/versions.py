"""Policy versions only ever increase: the newest applied version is kept on disk, so no restart hands one out again.

The ledger is one small JSON file in the coordinator's state directory (by default the experiences directory, where
the explorer keeps its resume state), replaced atomically. A push gets ``current + 1`` or the version the trainer
asks for, which must be newer than every version applied, persisted or still in flight.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

STATE_FILE = "sync-state.json"


class VersionConflictError(ValueError):
    """A trainer asked for a version that is not newer than the current one (permanent: send a newer one)."""

    def __init__(self, current: int, requested: int):
        super().__init__(
            f"version {requested} is not newer than the current policy version {current}: "
            f"send a version above {current}, or none to get {current + 1}"
        )
        self.current = current
        self.requested = requested


def next_version(current: int, requested: int | None) -> int:
    """The version a push gets: ``requested`` if it is newer than ``current``; by default ``current + 1``."""
    if requested is None:
        return current + 1
    if requested <= current:
        raise VersionConflictError(current, requested)
    return requested


def load_version(directory: Path) -> int:
    """The newest version recorded in ``directory`` (0: none yet)."""
    path = directory / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return 0
    except ValueError as err:
        raise ValueError(f"{path} is not a sync state file ({err}); move it away to start versions afresh") from None
    version = data.get("policyVersion") if isinstance(data, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ValueError(f"{path} holds no policyVersion; move it away to start versions afresh")
    return version


def load_pushes(directory: Path) -> int:
    """How many pushes the job has had, as recorded beside the version (0: none, or a ledger from before the count
    was kept)."""
    try:
        data = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return 0
    pushes = data.get("pushes") if isinstance(data, dict) else None
    return pushes if isinstance(pushes, int) and not isinstance(pushes, bool) and pushes >= 0 else 0


def save_version(directory: Path, version: int, pushes: int = 0) -> None:
    """Record ``version`` and the job's push count (fsynced, then renamed over the old file: a reader sees the old
    or the new one)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"policyVersion": version, "pushes": pushes}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
