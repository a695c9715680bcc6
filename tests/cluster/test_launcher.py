"""The launcher leaves nothing behind: not on `cluster down`, not on Ctrl-C, not when it is SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest

from kubeplane import cluster, paths
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

REPO = paths.repo_root()


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(text in arg for arg in cmdline) and proc.pid != os.getpid():
            found.append(proc)
    return found


def start_holder(parent: Path) -> tuple[subprocess.Popen[str], Path]:
    holder = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster.hold_cluster", str(parent)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert holder.stdout is not None
    for line in holder.stdout:
        if line.startswith("READY "):
            # Keep reading: a holder whose pipe fills up (its shutdown logs) would block and never exit.
            threading.Thread(target=holder.stdout.read, daemon=True).start()
            return holder, Path(line.split(" ", 1)[1].strip())
    holder.wait(timeout=30)
    raise AssertionError(f"holder exited {holder.returncode} before the cluster was ready")


def test_ctrl_c_stops_every_component_and_removes_the_workdir(tmp_path: Path) -> None:
    holder, workdir = start_holder(tmp_path)
    components = processes_mentioning(str(workdir))
    assert {p.name() for p in components} >= {"etcd", "kube-apiserver", "kwok"}
    holder.send_signal(signal.SIGINT)
    # stop() gives each of the five components up to 10 s of SIGTERM grace and 5 s more after SIGKILL: on a loaded
    # machine that can pass a minute.
    assert holder.wait(timeout=150) != 0  # interrupted, not a clean exit
    wait_for(lambda: not processes_mentioning(str(workdir)), timeout=20, what="components gone")
    assert not workdir.exists()
    assert list(tmp_path.iterdir()) == []


def test_sigkilled_launcher_takes_its_components_along_and_next_start_cleans_up(tmp_path: Path) -> None:
    holder, workdir = start_holder(tmp_path)
    assert processes_mentioning(str(workdir))
    holder.kill()
    holder.wait(timeout=10)
    wait_for(lambda: not processes_mentioning(str(workdir)), timeout=20, what="components killed with the launcher")
    assert workdir.exists()  # nobody was left to delete it ...
    assert cluster.remove_stale_workdirs(tmp_path) == [workdir]  # ... so the next start does
    assert not workdir.exists()


def test_cli_up_env_down_serves_kubectl_and_leaves_nothing_behind(tmp_path: Path) -> None:
    env = {**os.environ, "KUBEPLANE_STATE_DIR": str(tmp_path)}
    cli = [sys.executable, "-m", "kubeplane", "cluster"]
    up = subprocess.run([*cli, "up", "--nodes", "1", "--gpus", "2"], env=env, capture_output=True, text=True,
                        timeout=180, check=False)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        exports = dict(line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines())
        state = json.loads((tmp_path / "state.json").read_text())
        kube_env = {**env, "KUBECONFIG": exports["KUBECONFIG"],
                    "PATH": exports["PATH"].replace("$PATH", os.environ["PATH"])}  # fmt: skip
        nodes = json.loads(subprocess.run(["kubectl", "get", "nodes", "-o", "json"], env=kube_env,
                                          capture_output=True, text=True, check=True, timeout=30).stdout)  # fmt: skip
        assert [n["status"]["allocatable"]["nvidia.com/gpu"] for n in nodes["items"]] == ["2"]
        supervisor = psutil.Process(state["pid"])
        children = supervisor.children(recursive=True)
        assert len(children) >= 5
    finally:
        down = subprocess.run([*cli, "down"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children),
             timeout=20, what="cluster processes gone")  # fmt: skip
    assert not (tmp_path / "state.json").exists()
    assert subprocess.run([*cli, "env"], env=env, capture_output=True, check=False).returncode == 1
