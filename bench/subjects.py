"""What bench/operator_vs_kuberay.py measures: ExplorerJobs, RayClusters, or the same pods created directly.

A subject creates, scales and deletes one job (1 coordinator/head + N engines/workers) in its namespace and says
which job a pod belongs to: the controlling owner's UID for the operators (so a recreated job's pods never count
for the one deleted under the same name), the ``bench`` label for directly created pods.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import kuberay_local
import operator_figures
import psutil
from kubernetes import client
from kubernetes.client.rest import ApiException
from operator_scale import bare_pod, job

from explorer_operator import models

TICKS = os.sysconf("SC_CLK_TCK")
HTTP_NOT_FOUND = 404
CHILD_KINDS = ("pods", "services", "configmaps", "networkpolicies")


def raw_list(api: client.ApiClient, namespace: str, kind: str = "pods") -> list[dict[str, Any]]:
    """Objects as plain dicts (no model decoding: hundreds of pods, listed four times a second)."""
    core, net = client.CoreV1Api(api), client.NetworkingV1Api(api)
    lists = {
        "pods": core.list_namespaced_pod,
        "services": core.list_namespaced_service,
        "configmaps": core.list_namespaced_config_map,
        "networkpolicies": net.list_namespaced_network_policy,
    }
    items: list[dict[str, Any]] = json.loads(lists[kind](namespace, _preload_content=False).data)["items"]
    return items


def is_running(pod: dict[str, Any]) -> bool:
    return pod.get("status", {}).get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")


def controller_uid(obj: dict[str, Any]) -> str | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref["uid"])
    return None


def delete_namespace(core: client.CoreV1Api, namespace: str, timeout: float) -> None:
    """Delete a part's namespace and wait until it is gone (with its operator still running, for finalizers)."""
    core.delete_namespace(namespace)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except ApiException as err:
            if err.status == HTTP_NOT_FOUND:
                return
            raise
        time.sleep(0.5)
    raise SystemExit(f"namespace {namespace} not gone after {timeout}s")


class Subject:
    """Directly created pods: the baseline (no operator, no custom resource)."""

    name = "direct"
    agents: tuple[str, ...] = ()

    def __init__(self, api: client.ApiClient, namespace: str, pid: int | None = None) -> None:
        self.api, self.namespace, self.pid = api, namespace, pid
        self.core = client.CoreV1Api(api)

    def create(self, name: str, engines: int) -> str:
        self.core.create_namespaced_pod(self.namespace, bare_pod(f"{name}-coordinator", name, 0))
        for index in range(engines):
            self.core.create_namespaced_pod(self.namespace, bare_pod(f"{name}-engine-{index}", name, 1))
        return name

    def scale(self, name: str, old: int, new: int) -> None:
        for index in range(old, new):
            self.core.create_namespaced_pod(self.namespace, bare_pod(f"{name}-engine-{index}", name, 1))

    def delete(self, name: str) -> None:
        self.core.delete_collection_namespaced_pod(self.namespace, label_selector=f"bench={name}")

    def gone(self, name: str) -> bool:
        return not self.core.list_namespaced_pod(self.namespace, label_selector=f"bench={name}").items

    def group_of(self, pod: dict[str, Any]) -> str | None:
        return (pod["metadata"].get("labels") or {}).get("bench")

    def orphans(self) -> int | None:
        return None  # nothing owns directly created pods

    # ---- the operator process, from /proc ----------------------------------------------------------------
    def _pids(self) -> list[int]:
        if self.pid is None:
            return []
        return [self.pid, *(c.pid for c in psutil.Process(self.pid).children(recursive=True))]

    def cpu_seconds(self) -> float:
        return sum(operator_figures.cpu_seconds(Path(f"/proc/{p}/stat").read_text(), TICKS) for p in self._pids())

    def peak_rss(self) -> int:
        return 1024 * sum(operator_figures.status_kib(Path(f"/proc/{p}/status").read_text(), "VmHWM")
                          for p in self._pids())  # fmt: skip


class CustomSubject(Subject):
    """Jobs as custom resources reconciled by an operator; each job's pods are those its object controls."""

    group, version, plural = models.GROUP, models.VERSION, models.PLURAL

    def __init__(self, api: client.ApiClient, namespace: str, pid: int | None = None) -> None:
        super().__init__(api, namespace, pid)
        self.custom = client.CustomObjectsApi(api)

    def manifest(self, name: str, engines: int) -> dict[str, Any]:
        raise NotImplementedError

    def scale_patch(self, engines: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def create(self, name: str, engines: int) -> str:
        obj = self.custom.create_namespaced_custom_object(self.group, self.version, self.namespace, self.plural,
                                                          self.manifest(name, engines))  # fmt: skip
        return str(obj["metadata"]["uid"])

    def scale(self, name: str, old: int, new: int) -> None:
        self.custom.patch_namespaced_custom_object(self.group, self.version, self.namespace, self.plural, name,
                                                   self.scale_patch(new),
                                                   _content_type="application/json-patch+json")  # fmt: skip

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(self.group, self.version, self.namespace, self.plural, name)

    def gone(self, name: str) -> bool:
        try:
            self.custom.get_namespaced_custom_object(self.group, self.version, self.namespace, self.plural, name)
        except ApiException as err:
            if err.status == HTTP_NOT_FOUND:
                return True
            raise
        return False

    def group_of(self, pod: dict[str, Any]) -> str | None:
        return controller_uid(pod)

    def live_uids(self) -> set[str]:
        items = self.custom.list_namespaced_custom_object(self.group, self.version, self.namespace, self.plural)
        return {str(obj["metadata"]["uid"]) for obj in items["items"]}

    def orphans(self) -> int | None:
        """Children (pods, Services, ConfigMaps, NetworkPolicies) no live job controls, and pods nothing owns."""
        live = self.live_uids()
        count = 0
        for kind in CHILD_KINDS:
            for obj in raw_list(self.api, self.namespace, kind):
                if obj["metadata"]["name"] == "kube-root-ca.crt":
                    continue  # the namespace's own ConfigMap
                uid = controller_uid(obj)
                count += (uid not in live) if uid else kind == "pods"
        return count


class Ours(CustomSubject):
    name = "ours"
    agents = ("explorer-operator", "kopf")

    def manifest(self, name: str, engines: int) -> dict[str, Any]:
        return job(name, engines)

    def scale_patch(self, engines: int) -> list[dict[str, Any]]:
        return [{"op": "replace", "path": "/spec/engines/replicas", "value": engines}]


class KubeRay(CustomSubject):
    name = "kuberay"
    agents = (kuberay_local.USER_AGENT,)
    group, version, plural = kuberay_local.GROUP, kuberay_local.VERSION, kuberay_local.PLURAL

    def manifest(self, name: str, engines: int) -> dict[str, Any]:
        return kuberay_local.ray_cluster(name, engines)

    def scale_patch(self, engines: int) -> list[dict[str, Any]]:
        return kuberay_local.scale_patch(engines)
