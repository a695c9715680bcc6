"""Child processes owned by the launcher: own process group, log file, death with the parent, bounded stop."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: the kernel SIGKILLs it if the launcher dies without cleaning up."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _prepare_child(cgroup_procs: Sequence[Path]) -> None:
    """Before exec: die with the launcher, and join the given cgroups (so everything it forks is findable)."""
    _die_with_parent()
    pid = str(os.getpid()).encode()
    for procs_file in cgroup_procs:
        fd = os.open(procs_file, os.O_WRONLY)
        try:
            os.write(fd, pid)
        finally:
            os.close(fd)


class ManagedProcess:
    """One component process with its own log; ``stop`` always leaves nothing running."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cgroup_procs: Sequence[Path] = (),
    ):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
            # Only prctl and a few writes: safe before exec.
            preexec_fn=(lambda: _prepare_child(cgroup_procs)) if cgroup_procs else _die_with_parent,  # noqa: PLW1509
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def stop(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the process group, wait up to ``grace_seconds``, then SIGKILL what is left."""
        if self.running():
            self.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace_seconds
            while self.running() and time.monotonic() < deadline:
                time.sleep(0.05)
        # The leader may have exited while a child of its group lingers: kill the group regardless.
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        self._log.close()
