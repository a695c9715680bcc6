"""A real local Ray cluster for the runtime tests (one per session), with the repo importable by its workers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kubeplane import paths


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    import ray

    # Workers inherit the driver's environment: custom test workflows are imported from the repo by module path.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(paths.repo_root()), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="explorer-tests",
             _node_ip_address="127.0.0.1")  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()
