"""Small helpers for pods on real nodes: manifests that land there, kubectl, and waiting on phases."""

from __future__ import annotations

import json
import subprocess
from typing import Any

from kubernetes import client

from explorer_operator import demo_stack
from kubeplane import images
from kubeplane.cluster import LocalCluster
from tests.waiting import wait_for

ON_REAL_NODES = demo_stack.ON_REAL_NODES
RESTRICTED_CONTAINER = demo_stack.RESTRICTED_CONTAINER


def python_pod(
    name: str,
    script: str,
    labels: dict[str, str] | None = None,
    image: str = images.BASE_REF,
    restart: str = "Never",
    **spec: Any,
) -> dict[str, Any]:
    """A pod running ``python3 -c script`` on a real node, as a restricted, non-root container."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {"app": name}},
        "spec": {
            **ON_REAL_NODES,
            "restartPolicy": restart,
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": ["python3", "-c", script],
                    **RESTRICTED_CONTAINER,
                }
            ],
            **spec,
        },
    }


def kubectl(
    plane: LocalCluster, *args: str, timeout: float = 120, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["kubectl", *args], env=plane.env(), capture_output=True, text=True, timeout=timeout, check=False, input=stdin
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def apply(plane: LocalCluster, namespace: str, *objects: dict[str, Any]) -> None:
    kubectl(plane, "apply", "-n", namespace, "-f", "-", stdin="\n---\n".join(json.dumps(o) for o in objects))


def pod_phase(api: client.ApiClient, namespace: str, name: str) -> str:
    try:
        pod = client.CoreV1Api(api).read_namespaced_pod(name, namespace)
    except client.ApiException as err:
        return f"missing ({err.status})"
    return str(pod.status.phase)


def wait_phase(api: client.ApiClient, namespace: str, name: str, phases: set[str], timeout: float = 180) -> str:
    return wait_for(
        lambda: (p := pod_phase(api, namespace, name)) in phases and p,
        timeout=timeout,
        what=f"pod {namespace}/{name} in {sorted(phases)}",
    )


def wait_ready(api: client.ApiClient, namespace: str, name: str, timeout: float = 180) -> None:
    def ready() -> bool:
        try:
            pod = client.CoreV1Api(api).read_namespaced_pod(name, namespace)
        except client.ApiException:
            return False
        return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])

    wait_for(ready, timeout=timeout, what=f"pod {namespace}/{name} Ready")


def logs(plane: LocalCluster, namespace: str, name: str) -> str:
    return kubectl(plane, "logs", "-n", namespace, name, check=False).stdout
