"""Shared fixtures: one real local control plane per test session, and a fresh namespace per test."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client

from kubeplane import cluster as kubeplane_cluster


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
