"""Runs one real vLLM OpenAI server as a local subprocess (the embedded default and the tests use it)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

import httpx

from explorer import engine_args

# Offline and quiet: no hub, no usage reporting; nothing may leave loopback.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a local engine or status server."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_binding(index: int) -> dict[str, str]:
    """Pin local CPU engine ``index`` to its own core (vLLM's auto binding puts every engine on core 0)."""
    cores = os.cpu_count() or 1
    return {"VLLM_CPU_OMP_THREADS_BIND": str(index % cores)}


class EngineStartError(RuntimeError):
    """The engine exited or did not answer /health in time; the message carries its log tail."""


class LocalEngine:
    """A ``vllm`` server subprocess; ``stop()`` ends it and its workers."""

    def __init__(self, args: engine_args.EngineArgs, log_path: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log_path
        self._env = {**os.environ, **OFFLINE_ENV, **engine_args.engine_env(args), **(env or {})}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.args.host}:{self.args.port}"

    def start(self, timeout: float = 600.0) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the server process without waiting (start several, then ``wait_ready`` on each)."""
        argv = [sys.executable, "-m", engine_args.VLLM_SERVER_MODULE, *engine_args.build_vllm_serve_args(self.args)]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                argv, env=self._env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, timeout: float = 600.0) -> None:
        assert self._proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise EngineStartError(f"vLLM exited with {self._proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if http.get(f"{self.base_url}/health").status_code == 200:
                        return
                time.sleep(0.5)
        self.stop()
        raise EngineStartError(f"vLLM not healthy after {timeout:.0f}s:\n{self.log_tail()}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace_seconds: float = 20.0) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=grace_seconds)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)  # workers the server spawned share its group
        self._proc.wait(timeout=10)
        self._proc = None

    def __enter__(self) -> LocalEngine:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
