"""One plane with a real node per test session (real kubelet, containerd, cluster DNS, enforced NetworkPolicy),
with the project's images imported; e2e tests run after everything else, since they share two busy cores."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client

from kubeplane import cluster as kubeplane_cluster


@pytest.fixture(scope="session")
def real_plane() -> Iterator[kubeplane_cluster.LocalCluster]:
    cfg = kubeplane_cluster.ClusterConfig(nodes=1, real_nodes=1, images=("operator", "runtime-cpu"))
    with kubeplane_cluster.LocalCluster(cfg) as started:
        timings = ", ".join(f"{k} {v:.1f}s" for k, v in started.timings.items())
        print(f"\nreal-node plane up at {started.server}: {timings}")
        yield started


@pytest.fixture(scope="session")
def real_api(real_plane: kubeplane_cluster.LocalCluster) -> Iterator[client.ApiClient]:
    with real_plane.api_client() as api:
        yield api


@pytest.fixture
def real_namespace(request: pytest.FixtureRequest, real_api: client.ApiClient) -> Iterator[str]:
    """A namespace of the test's own on the real-node plane, deleted afterwards."""
    stem = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(real_api)
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)
