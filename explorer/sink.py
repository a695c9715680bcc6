"""Experience sink: one file per explore step, committed durably, listed in a manifest the trainer reads.

A step's experiences are written to a temporary file, fsynced, renamed into place and the directory fsynced (the
rename itself survives a power cut), then the manifest, written the same way, gains the step: a reader never sees
half a step, and a step already in the manifest is never written again — so every (step, task, run) lands exactly
once, also when the coordinator restarts mid-step. A step committed short names its missing tasks in the manifest.
A step every consumer of the experience stream has acknowledged may be removed (``remove_step``, retention
``consumed``): its file goes, its manifest entry stays, marked ``removed``, so the step still counts as committed.
Writes block: the explorer runs them off its event loop; one lock keeps the manifest's read-modify-writes apart.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from explorer.experience import Experience

MANIFEST = "manifest.json"


def fsync_directory(directory: Path) -> None:
    """Make the renames and creations in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably: temporary file, fsync, rename, fsync of the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _parquet_bytes(records: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**r, "info": json.dumps(r["info"])} for r in records]
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    data: bytes = buffer.getvalue().to_pybytes()
    return data


class ExperienceSink:
    """Writes committed steps under ``directory`` in JSONL or Parquet."""

    def __init__(self, directory: Path, fmt: str = "jsonl"):
        self.directory = directory
        self.format = fmt
        self._manifest_lock = threading.Lock()  # commits and removals run in worker threads
        directory.mkdir(parents=True, exist_ok=True)

    def manifest(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.directory / MANIFEST).read_text())
        except FileNotFoundError:
            data = {"format": self.format, "steps": {}}
        return data

    def committed_steps(self) -> set[int]:
        return {int(step) for step in self.manifest()["steps"]}

    def commit(
        self,
        step: int,
        experiences: Sequence[Experience],
        policy_version: int | None = None,
        missing_tasks: Sequence[int] = (),
        pending_tasks: Mapping[int, tuple[int, Sequence[int]]] | None = None,
    ) -> bool:
        """Write step ``step`` once; False (and nothing written) when it is already committed. ``missing_tasks``:
        the task ids the step was committed without (its wait expired), listed in its manifest entry.
        ``pending_tasks``: batch -> (its taskset cursor, task ids) still running after this commit (over-rollout),
        recorded with it so that a restart runs exactly those again."""
        with self._manifest_lock:
            manifest = self.manifest()
            if str(step) in manifest["steps"]:
                return False
            name = f"step-{step:08d}.{'parquet' if self.format == 'parquet' else 'jsonl'}"
            records = [e.to_record() for e in experiences]
            if self.format == "parquet":
                body = _parquet_bytes(records)
            else:
                body = "".join(json.dumps(r) + "\n" for r in records).encode()
            write_durably(self.directory / name, body)
            manifest["steps"][str(step)] = {"file": name, "experiences": len(records), "policyVersion": policy_version,
                                            "missingTasks": sorted(missing_tasks)}  # fmt: skip
            if pending_tasks:
                manifest["steps"][str(step)]["pendingTasks"] = {
                    str(batch): {"cursor": cursor, "tasks": sorted(ids)}
                    for batch, (cursor, ids) in pending_tasks.items()
                }
            write_durably(self.directory / MANIFEST, json.dumps(manifest, indent=1).encode())
            return True

    def pending_tasks(self, step: int) -> dict[int, tuple[int, list[int]]]:
        """What committed step ``step`` left running (``commit``'s ``pending_tasks``)."""
        entry = self.manifest()["steps"].get(str(step), {})
        return {
            int(b): (int(p["cursor"]), [int(t) for t in p["tasks"]]) for b, p in entry.get("pendingTasks", {}).items()
        }

    def record_eval(self, name: str, step: int, metrics: dict[str, float]) -> None:
        """Keep an eval set's figures at ``step`` in the manifest (``eval.<name>.<step>``), written durably."""
        with self._manifest_lock:
            manifest = self.manifest()
            manifest.setdefault("eval", {}).setdefault(name, {})[str(step)] = metrics
            write_durably(self.directory / MANIFEST, json.dumps(manifest, indent=1).encode())

    def remove_step(self, step: int) -> bool:
        """Delete a committed step's file, its manifest entry kept and marked ``removed`` (marked first: the manifest
        never lists a missing file as present); False when it was removed already."""
        with self._manifest_lock:
            manifest = self.manifest()
            entry = manifest["steps"][str(step)]
            if entry.get("removed"):
                return False
            entry["removed"] = True
            write_durably(self.directory / MANIFEST, json.dumps(manifest, indent=1).encode())
            (self.directory / entry["file"]).unlink(missing_ok=True)
            fsync_directory(self.directory)
            return True

    def read_step(self, step: int) -> list[Experience]:
        entry = self.manifest()["steps"][str(step)]
        if entry.get("removed"):
            raise FileNotFoundError(f"step {step} was removed after every consumer acknowledged it "
                                    "(experiences.retention: consumed)")  # fmt: skip
        path = self.directory / entry["file"]
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
            return [Experience.from_record({**r, "info": json.loads(r["info"])}) for r in rows]
        return [Experience.from_record(json.loads(line)) for line in path.read_text().splitlines() if line]
