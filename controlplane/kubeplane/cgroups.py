"""Cgroups for real nodes: one tree nested under the launcher's own cgroup, the same path in every hierarchy.

kubelet's ``cgroupRoot`` is one path for every controller, so the tree is created at the same path in every
mounted hierarchy (v1 controllers, ``name=systemd`` and the unified mount), below the session's most specific own
path (its memory cgroup here). Nothing is created anywhere else and nothing pre-existing is ever changed: the
directories this module made are recorded in a manifest, so a later start can kill what is left in them (a
SIGKILLed launcher's containers) and remove them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
PROC_CGROUP = Path("/proc/self/cgroup")


class CgroupError(RuntimeError):
    """The cgroup layout does not allow a nested tree (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy: where it is mounted and this process's path in it."""

    mount: Path
    own_path: str
    controllers: tuple[str, ...]

    def dir(self, path: str) -> Path:
        return self.mount / path.lstrip("/")


def parse_mountinfo(text: str) -> list[tuple[Path, frozenset[str]]]:
    """Cgroup mounts as (mount point, super options); the unified mount has the empty option set."""
    mounts: list[tuple[Path, frozenset[str]]] = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        if rfields[0] == "cgroup2":
            mounts.append((Path(fields[4]), frozenset()))
        elif rfields[0] == "cgroup":
            mounts.append((Path(fields[4]), frozenset(rfields[2].split(","))))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup as {controllers: path} ("" for the unified hierarchy)."""
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[parts[1]] = parts[2]
    return paths


def match_hierarchies(mounts: list[tuple[Path, frozenset[str]]], own: dict[str, str]) -> list[Hierarchy]:
    """Pair each /proc/self/cgroup entry with the mount of its hierarchy (first mount wins)."""
    found = []
    for key, path in own.items():
        wanted = frozenset(key.split(",")) if key else frozenset()
        for mount, options in mounts:
            if (not wanted and not options) or (wanted and wanted <= options):
                found.append(Hierarchy(mount, path, tuple(sorted(wanted))))
                break
    return found


def hierarchies() -> list[Hierarchy]:
    return match_hierarchies(parse_mountinfo(MOUNTINFO.read_text()), parse_proc_cgroup(PROC_CGROUP.read_text()))


def nested_base(found: list[Hierarchy]) -> str:
    """The most specific own path; every other hierarchy's own path must be an ancestor of it."""
    base = max((h.own_path for h in found), key=lambda p: len(p.rstrip("/")))
    for h in found:
        own = h.own_path.rstrip("/") + "/"
        if not (base.rstrip("/") + "/").startswith(own):
            raise CgroupError(
                f"this process is in {h.own_path} for {','.join(h.controllers) or 'cgroup2'} but in {base} elsewhere: "
                "a real node needs one cgroup path valid in every hierarchy"
            )
    return base


@dataclasses.dataclass
class CgroupTree:
    """A tree at ``path`` in every hierarchy; ``created`` lists each directory made for it (deepest last)."""

    path: str
    manifest: Path
    created: list[str] = dataclasses.field(default_factory=list)

    def make(self, sub: str = "") -> str:
        """Create ``path/sub`` in every hierarchy (and any missing ancestors); returns the cgroup path."""
        target = f"{self.path}/{sub}".rstrip("/") if sub else self.path
        for h in hierarchies():
            parts = [p for p in target.split("/") if p]
            current = h.mount
            for part in parts:
                current = current / part
                if current.is_dir():
                    continue
                current.mkdir()
                self.created.append(str(current))
                self._save()
                _inherit_cpuset(current)
        return target

    def procs_files(self, sub: str) -> list[Path]:
        """The ``cgroup.procs`` files a process writes itself into to join ``path/sub`` everywhere."""
        return [h.dir(f"{self.path}/{sub}") / "cgroup.procs" for h in hierarchies()]

    def _save(self) -> None:
        self.manifest.write_text(json.dumps({"path": self.path, "created": self.created}))

    def destroy(self, timeout: float = 20.0) -> None:
        """Kill every process left in the tree, then remove each directory this tree created (deepest first)."""
        destroy_recorded(self.created, timeout)
        self.created.clear()
        with contextlib.suppress(FileNotFoundError):
            self.manifest.unlink()


def _inherit_cpuset(directory: Path) -> None:
    # A v1 cpuset cgroup takes no task until its cpus and mems are set: copy the parent's.
    for name in ("cpuset.cpus", "cpuset.mems"):
        mine, parents = directory / name, directory.parent / name
        if mine.exists() and parents.exists() and not mine.read_text().strip():
            mine.write_text(parents.read_text().strip() or "0")


def _pids_below(directory: Path) -> set[int]:
    pids: set[int] = set()
    for procs in directory.rglob("cgroup.procs"):
        with contextlib.suppress(OSError, ValueError):
            pids.update(int(p) for p in procs.read_text().split())
    return pids


def destroy_recorded(created: list[str], timeout: float = 20.0) -> None:
    """Kill what runs in the recorded directories (and below), then rmdir them bottom-up."""
    roots = [Path(c) for c in created]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = set().union(*(_pids_below(r) for r in roots if r.is_dir())) - {os.getpid()}
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for root in sorted(roots, key=lambda p: len(p.parts), reverse=True):
        if not root.is_dir():
            continue
        for child in sorted((d for d in root.rglob("*") if d.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            root.rmdir()


def new_tree(name: str, manifest: Path) -> CgroupTree:
    """A tree ``<own nested path>/<name>`` recorded in ``manifest``; call ``make`` to create it."""
    base = nested_base(hierarchies())
    return CgroupTree(f"{base.rstrip('/')}/{name}", manifest)


def destroy_from_manifest(manifest: Path) -> None:
    """Clean up after a launcher that died without stopping (its manifest is all that is left)."""
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return
    destroy_recorded(list(data.get("created", [])))
    with contextlib.suppress(FileNotFoundError):
        manifest.unlink()
