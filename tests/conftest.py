"""Shared fixtures: one real local control plane per test session, and a fresh namespace per test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from explorer import credentials, engine_args, local_engine, tiny_model
from explorer_operator.local import LocalOperator, running_operator
from kubeplane import cluster as kubeplane_cluster
from kubeplane import paths


def pytest_configure(config: pytest.Config) -> None:
    """One set of job credentials for every local process of the run (coordinators, engines, Ray workers and trainer
    subprocesses inherit it); removed at the end."""
    if os.environ.get(credentials.DIR_ENV):
        return
    made = credentials.make_local(Path(tempfile.mkdtemp(prefix="explorer-test-credentials-")))
    config.add_cleanup(lambda: shutil.rmtree(made, ignore_errors=True))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked ``destructive`` break a shared fixture: run them after everything else; e2e tests last of all
    (their plane with a real node starts when the first of them runs)."""
    items.sort(key=lambda item: (item.get_closest_marker("e2e") is not None,
                                 item.get_closest_marker("destructive") is not None))  # fmt: skip


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[kubeplane_cluster.LocalCluster]:
    """The session's control plane (4 fake nodes x 8 GPUs); stopped even when tests fail or are interrupted."""
    with kubeplane_cluster.LocalCluster() as started:
        timings = ", ".join(f"{k} {v:.1f}s" for k, v in started.timings.items())
        print(f"\nlocal cluster up at {started.server}: {timings}")
        yield started


@pytest.fixture(scope="session")
def k8s(local_cluster: kubeplane_cluster.LocalCluster) -> Iterator[client.ApiClient]:
    with local_cluster.api_client() as api:
        yield api


@pytest.fixture
def namespace(request: pytest.FixtureRequest, k8s: client.ApiClient) -> Iterator[str]:
    """A namespace of the test's own, deleted afterwards (without waiting: the cluster cleans it up)."""
    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s)
    core.create_namespace({"metadata": {"name": name, "labels": {"kubeplane.test": "true"}}})
    yield name
    core.delete_namespace(name)


def free_port() -> int:
    return kubeplane_cluster.free_port()


@pytest.fixture(scope="session")
def crd_installed(local_cluster: kubeplane_cluster.LocalCluster) -> None:
    env = local_cluster.env()
    subprocess.run(["kubectl", "apply", "--server-side", "-f", str(paths.repo_root() / "crds")], env=env, check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    crd = "crd/explorerjobs.explorer.rft.dev"
    subprocess.run(["kubectl", "wait", "--for=condition=Established", "--timeout=60s", crd],
                   env=env, check=True, capture_output=True, timeout=90)  # fmt: skip


@pytest.fixture(scope="session")
def operator(
    local_cluster: kubeplane_cluster.LocalCluster, crd_installed: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalOperator]:
    with running_operator(local_cluster, tmp_path_factory.mktemp("operator") / "operator.log") as running:
        running.wait_live()
        yield running


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return tiny_model.make_tiny_model(tiny_model.default_model_dir())


# The tool-use tests' named and "auto" tool choices need a parser; pythonic needs no special tokens in the vocabulary.
TOOL_CALL_ARGS = ("--enable-auto-tool-choice", "--tool-call-parser", "pythonic")


@pytest.fixture(scope="session")
def cpu_engines(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[local_engine.LocalEngine]]:
    """The session's pair of real CPU vLLM engines on the tiny model (started together, stopped at the end).

    They accept gloo weight pushes; the weight-sync tests put the original weights back when they finish.
    """
    logs = tmp_path_factory.mktemp("engines")
    engines = [
        local_engine.LocalEngine(
            engine_args.EngineArgs(model=str(tiny_model_dir), served_model_name="tiny", port=free_port(),
                                   dtype="float32", max_model_len=256, max_num_seqs=16, seed=0,
                                   kv_cache_memory_bytes=64 << 20, enforce_eager=True, weight_sync="gloo",
                                   extra_args=TOOL_CALL_ARGS),
            logs / f"engine-{i}.log",
            env=local_engine.cpu_binding(i),
        )
        for i in range(2)
    ]  # fmt: skip
    try:
        for engine in engines:
            engine.launch()
        for engine in engines:
            engine.wait_ready()
        yield engines
    finally:
        for engine in engines:
            engine.stop()


@pytest.fixture(scope="session")
def cpu_engine(cpu_engines: list[local_engine.LocalEngine]) -> local_engine.LocalEngine:
    return cpu_engines[0]
