"""KubeRay's operator on a kubeplane plane: its CRDs, a RayCluster shaped like an ExplorerJob, the operator process.

The operator is built from its pinned Go module (controlplane/modules/kuberay, a benchmark-only component of
kubeplane/build.py) and runs as a host process with the plane's kubeconfig; its CRDs are the YAMLs its module
ships (config/crd/bases), copied next to the binary by the build.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from kubeplane import build, cluster, nodes

GROUP, VERSION, PLURAL, KIND = "ray.io", "v1", "rayclusters", "RayCluster"
CLUSTER_LABEL = "ray.io/cluster"
USER_AGENT = "kuberay-operator"
WORKER_GROUP = "engines"
MAX_WORKERS = 64
# Host process, one replica: no leader election (a Lease per run), all namespaces (no --watch-namespace), probes
# and metrics on free loopback ports instead of :8082/:8080, plain console logs. Everything else is KubeRay's
# default: --reconcile-concurrency=1, --qps=100, --burst=200, batch scheduler and webhooks off.
FLAGS = ("--enable-leader-election=false", "--log-stdout-encoder=console")


def ensure_built() -> build.BuildResult:
    """KubeRay's operator and CRDs, built from the pinned module or found in the cache (minutes the first time)."""
    return build.ensure_built(build.BENCH_COMPONENTS)["kuberay"]


def version() -> str:
    """The pinned KubeRay module version (go.mod of controlplane/modules/kuberay)."""
    component = next(c for c in build.BENCH_COMPONENTS if c.name == "kuberay")
    for line in (component.module_dir / "go.mod").read_text().splitlines():
        if line.strip().startswith(build.KUBERAY_MODULE + " "):
            return line.split()[1]
    return "unknown"


def install_crds(local: cluster.LocalCluster, built: build.BuildResult) -> None:
    """Server-side apply (the RayCluster CRD is too big for the last-applied annotation) and wait Established."""
    crds = sorted((built.directory / "crds").glob("*.yaml"))
    kubectl = str(local.binary("kubectl"))
    subprocess.run([kubectl, "apply", "--server-side", *(f"-f={p}" for p in crds)], env=local.env(), check=True,
                   capture_output=True)  # fmt: skip
    names = [f"crd/{p.name.removeprefix('ray.io_').removesuffix('.yaml')}.ray.io" for p in crds]
    subprocess.run([kubectl, "wait", "--for=condition=Established", "--timeout=60s", *names], env=local.env(),
                   check=True, capture_output=True)  # fmt: skip


def ray_cluster(name: str, workers: int) -> dict[str, Any]:
    """A RayCluster with the pods of an ExplorerJob: a head with the coordinator's requests, one GPU per worker."""
    head = {"name": "ray-head", "image": "x.invalid/ray", "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}
    gpu = {nodes.GPU_RESOURCE: "1"}
    worker = {"name": "ray-worker", "image": "x.invalid/ray", "resources": {"limits": gpu, "requests": gpu}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name},
        "spec": {
            "headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [head]}}},
            "workerGroupSpecs": [{"groupName": WORKER_GROUP, "replicas": workers, "minReplicas": 0,
                                  "maxReplicas": MAX_WORKERS, "rayStartParams": {},
                                  "template": {"spec": {"containers": [worker]}}}],
        },
    }  # fmt: skip


def scale_patch(workers: int) -> list[dict[str, Any]]:
    """A JSON patch setting the worker group's replicas."""
    return [{"op": "replace", "path": "/spec/workerGroupSpecs/0/replicas", "value": workers}]


@dataclasses.dataclass
class KubeRayOperator:
    process: subprocess.Popen[bytes]
    log: Path
    health_url: str

    def wait_live(self, timeout: float = 60.0) -> None:
        """Until the health probe answers and the RayCluster controller has started its workers (caches synced)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"KubeRay exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                started = any("Starting workers" in line and "raycluster" in line.lower()
                              for line in self.log.read_text(errors="replace").splitlines())  # fmt: skip
                if started and httpx.get(self.health_url, timeout=1).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"KubeRay not live after {timeout:.0f}s:\n{self.log.read_text()[-3000:]}")


@contextlib.contextmanager
def running_kuberay(local: cluster.LocalCluster, built: build.BuildResult, log: Path) -> Iterator[KubeRayOperator]:
    """The KubeRay operator binary against ``local`` (admin kubeconfig), stopped (SIGTERM, then SIGKILL) after."""
    probe, metrics = cluster.free_port(), cluster.free_port()
    argv = [str(built.binary("kuberay-operator")), *FLAGS, f"--health-probe-bind-address=127.0.0.1:{probe}",
            f"--metrics-addr=127.0.0.1:{metrics}"]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=local.env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        yield KubeRayOperator(proc, log, f"http://127.0.0.1:{probe}/healthz")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
