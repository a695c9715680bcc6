"""Runs the operator as a local subprocess against a kubeplane cluster (the demo, the tests, the benchmarks)."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

from kubeplane import cluster


@dataclasses.dataclass
class LocalOperator:
    process: subprocess.Popen[bytes]
    log: Path
    liveness_url: str
    metrics_url: str

    def wait_live(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.liveness_url, timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"operator not live after {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")

    def metric(self, name: str) -> float:
        """Sum of a Prometheus metric's samples (all labels)."""
        text = httpx.get(self.metrics_url, timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and line[len(name)] in " {"
        )


@contextlib.contextmanager
def running_operator(
    local: cluster.LocalCluster,
    log: Path,
    scope: Sequence[str] = ("--all-namespaces", "--standalone"),
    kubeconfig: Path | None = None,
) -> Iterator[LocalOperator]:
    """``python -m explorer_operator`` with plain logs, liveness and metrics on free loopback ports.

    ``kubeconfig`` runs it with other credentials than the cluster admin's (e.g. a ServiceAccount token).
    """
    live, metrics = cluster.free_port(), cluster.free_port()
    argv = [sys.executable, "-m", "explorer_operator", *scope, "--log-format", "plain",
            "--liveness", f"http://127.0.0.1:{live}/healthz", "--metrics-address", "127.0.0.1",
            "--metrics-port", str(metrics)]  # fmt: skip
    with log.open("wb") as out:
        env = {**local.env(), **({"KUBECONFIG": str(kubeconfig)} if kubeconfig else {})}
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield LocalOperator(proc, log, f"http://127.0.0.1:{live}/healthz", f"http://127.0.0.1:{metrics}/metrics")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
