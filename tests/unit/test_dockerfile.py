"""The Dockerfile without a Docker engine: its stages, pinned bases and non-root users, and that every command the
images run (entrypoints, and the commands the operator gives pods) exists and runs ``--help`` from the package."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from typing import Any

import pytest

from explorer import engine_args
from explorer_operator import builders, models
from kubeplane import paths

ROOT = paths.repo_root()


def stages() -> dict[str, list[dict[str, Any]]]:
    """Instructions per stage name (``FROM ... AS name``), comments dropped; key ``""`` holds global ARGs."""
    from dockerfile_parse import DockerfileParser

    out: dict[str, list[dict[str, Any]]] = {"": []}
    current = ""
    for instruction in DockerfileParser(str(ROOT / "Dockerfile")).structure:
        if instruction["instruction"] == "COMMENT":
            continue
        if instruction["instruction"] == "FROM":
            current = instruction["value"].split()[-1]
            out[current] = []
        out[current].append(instruction)
    return out


def global_args() -> dict[str, str]:
    return dict(i["value"].split("=", 1) for i in stages()[""] if i["instruction"] == "ARG")


def test_stages_bases_and_users() -> None:
    found = stages()
    assert list(found) == [
        "",
        "wheel",
        "operator-venv",
        "operator",
        "runtime",
        "local-python",
        "operator-local",
        "runtime-cpu",
    ]
    args = global_args()
    for base in args.values():
        name, _, tag = base.rpartition(":")
        assert name and re.fullmatch(r"v?\d+\.\d+(\.\d+)?(-[a-z0-9-]+)?", tag), f"{base} is not pinned to a version"
    vllm_pin = re.search(r'"vllm==([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert vllm_pin and args["VLLM_IMAGE"].endswith(f":v{vllm_pin.group(1)}")  # the engines' vLLM = the tested one
    for final in ("operator", "runtime", "operator-local", "runtime-cpu"):
        body = found[final]
        users = [i["value"] for i in body if i["instruction"] == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{final} runs as root"
        runs = " ".join(i["value"] for i in body if i["instruction"] == "RUN")
        assert not re.search(r"\b(gcc|g\+\+|build-essential|make|git)\b", runs), f"{final} installs build tools"
        assert "--no-cache-dir" in runs or not runs
    for stage, body in found.items():
        for copy in (i["value"] for i in body if i["instruction"] == "COPY" and "--from=" in i["value"]):
            source = copy.split("--from=")[1].split()[0]
            if source == "pyenv":  # the local variants' named context (an environment tree), not a stage
                continue
            assert list(found).index(source) < list(found).index(stage), f"{stage} copies from later stage {source}"


def exec_form(stage: str, instruction: str) -> list[str]:
    values = [i["value"] for i in stages()[stage] if i["instruction"] == instruction]
    return list(json.loads(values[-1])) if values else []


def test_operator_image_entrypoint_runs_from_the_package_and_needs_no_torch_or_ray() -> None:
    entrypoint, cmd = exec_form("operator", "ENTRYPOINT"), exec_form("operator", "CMD")
    assert entrypoint == ["python", "-m", "explorer_operator"]
    help_run = subprocess.run([sys.executable, *entrypoint[1:], *cmd, "--help"], capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
    assert help_run.returncode == 0 and "--all-namespaces" in help_run.stdout
    # The operator image installs only the `operator` extra: its entry point must not import the runtime's stack.
    probe = ("import sys, explorer_operator.__main__, explorer_operator.handlers, explorer_operator.reconcile; "
             "print(sorted({'torch', 'ray', 'vllm', 'pyarrow'} & {m.split('.')[0] for m in sys.modules}))")  # fmt: skip
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert imported.stdout.strip() == "[]"


def pod_commands() -> list[list[str]]:
    """The commands the operator puts in job pods (which the runtime image must provide)."""
    job = builders.JobRef("j", "ns", "uid")
    spec = models.ExplorerJobSpec.model_validate({"model": {"path": "/m"}, "taskset": {"path": "/t.jsonl"},
                                                  "coordinator": {"cpuWorkers": 1}})  # fmt: skip
    pods = builders.build_desired_pods(job, spec)
    return [pod["spec"]["containers"][0]["command"] for pod in pods.values()]


@pytest.mark.vllm
def test_runtime_image_commands_exist_and_run_help() -> None:
    commands = {tuple(c[:3]) if c[0].startswith("python") else tuple(c[:2]) for c in pod_commands()}
    assert ("python3", "-m", engine_args.VLLM_SERVER_MODULE) in commands
    assert ("python3", "-m", "explorer") in commands
    assert ("ray", "start") in commands
    assert exec_form("runtime", "CMD") == ["python3", "-m", "explorer", "--help"]
    bin_dir = paths.repo_root() / ".venv" / "bin"
    for command in sorted(commands):
        argv = [sys.executable, *command[1:]] if command[0] == "python3" else [str(bin_dir / command[0]), *command[1:]]
        result = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"{shlex.join(command)} --help failed:\n{result.stderr[-2000:]}"
