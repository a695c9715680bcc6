"""Proof that the local plane is a real Kubernetes: scheduling, controllers, GC, CRDs with CEL, fault injection."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from typing import Any

import psutil
import pytest
from kubernetes import client, dynamic
from kubernetes.client.rest import ApiException

from kubeplane import cluster as kubeplane_cluster
from kubeplane import nodes, paths
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def gpu_pod(name: str, gpus: int, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "example.invalid/engine:1",
                    "resources": {"limits": {nodes.GPU_RESOURCE: str(gpus)}},
                }
            ],
        },
    }


def test_fake_gpu_nodes_are_ready_with_loopback_addresses(k8s: client.ApiClient) -> None:
    node_list = client.CoreV1Api(k8s).list_node(label_selector="type=kwok").items
    assert len(node_list) == 4
    for node in node_list:
        assert node.status.allocatable[nodes.GPU_RESOURCE] == "8"
        assert nodes.node_is_schedulable(node)
        for address in node.status.addresses:
            if address.type == "InternalIP":
                assert ipaddress.ip_address(address.address) in LOOPBACK


def test_pod_with_two_gpus_is_scheduled_and_running(k8s: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(k8s)
    core.create_namespaced_pod(namespace, gpu_pod("engine", gpus=2))

    def running() -> client.V1Pod | None:
        pod = core.read_namespaced_pod("engine", namespace)
        return pod if pod.status.phase == "Running" else None

    pod = wait_for(running, what="pod Running")
    assert pod.spec.node_name.startswith("kwok-gpu-")
    assert ipaddress.ip_address(pod.status.pod_ip) in LOOPBACK
    ready = {c.type: c.status for c in pod.status.conditions}
    assert ready["Ready"] == "True"


def test_pod_asking_more_gpus_than_any_node_stays_unschedulable(k8s: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(k8s)
    core.create_namespaced_pod(namespace, gpu_pod("too-big", gpus=9))

    def unschedulable() -> client.V1PodCondition | None:
        pod = core.read_namespaced_pod("too-big", namespace)
        for cond in pod.status.conditions or []:
            if cond.type == "PodScheduled" and cond.reason == "Unschedulable":
                return cond
        return None

    cond = wait_for(unschedulable, what="PodScheduled=False/Unschedulable")
    assert cond.status == "False"
    assert "nvidia.com/gpu" in cond.message
    pod = core.read_namespaced_pod("too-big", namespace)
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None


def test_deployment_creates_ready_pods(k8s: client.ApiClient, namespace: str) -> None:
    apps = client.AppsV1Api(k8s)
    labels = {"app": "web"}
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]},
                },
            },
        },
    )
    wait_for(
        lambda: (apps.read_namespaced_deployment("web", namespace).status.ready_replicas or 0) == 3,
        what="3 ready replicas",
    )
    pods = client.CoreV1Api(k8s).list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 3
    assert all(p.metadata.owner_references[0].kind == "ReplicaSet" for p in pods)


def test_deleting_owner_garbage_collects_dependents(k8s: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(k8s)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    for i in range(2):
        core.create_namespaced_config_map(namespace, {"metadata": {"name": f"dependent-{i}", "ownerReferences": [ref]}})
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Foreground")

    def dependents_gone() -> bool:
        names = {cm.metadata.name for cm in core.list_namespaced_config_map(namespace).items}
        return not names & {"owner", "dependent-0", "dependent-1"}

    wait_for(dependents_gone, what="owner and dependents deleted")


def test_namespace_with_pods_is_deleted_completely(k8s: client.ApiClient) -> None:
    core = client.CoreV1Api(k8s)
    core.create_namespace({"metadata": {"name": "doomed"}})
    core.create_namespaced_pod("doomed", gpu_pod("engine", gpus=1))
    wait_for(lambda: core.read_namespaced_pod("engine", "doomed").status.phase == "Running", what="pod Running")
    core.delete_namespace("doomed")

    def gone() -> bool:
        try:
            core.read_namespace("doomed")
        except ApiException as err:
            return err.status == 404
        return False

    wait_for(gone, timeout=60, what="namespace 'doomed' to disappear")


CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.smoke.kubeplane.test"},
    "spec": {
        "group": "smoke.kubeplane.test",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer"},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.replicas <= self.maxReplicas",
                                        "message": "replicas must not exceed maxReplicas",
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_applied_server_side_serves_objects_and_enforces_cel(k8s: client.ApiClient, namespace: str) -> None:
    dyn = dynamic.DynamicClient(k8s)
    crds = dyn.resources.get(api_version="apiextensions.k8s.io/v1", kind="CustomResourceDefinition")
    crds.server_side_apply(body=CRD, field_manager="kubeplane-smoke")

    def established() -> bool:
        crd = crds.get(name=CRD["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for(established, what="CRD Established")
    dyn.resources.invalidate_cache()
    widgets = wait_for(lambda: _find_resource(dyn), what="widgets served by discovery")

    good = {
        "apiVersion": "smoke.kubeplane.test/v1",
        "kind": "Widget",
        "metadata": {"name": "ok"},
        "spec": {"replicas": 1, "maxReplicas": 2},
    }
    widgets.server_side_apply(body=good, namespace=namespace, field_manager="kubeplane-smoke")
    assert widgets.get(name="ok", namespace=namespace).spec.replicas == 1

    bad_cel = {**good, "metadata": {"name": "too-many"}, "spec": {"replicas": 3, "maxReplicas": 2}}
    with pytest.raises(ApiException) as cel_error:
        widgets.server_side_apply(body=bad_cel, namespace=namespace, field_manager="kubeplane-smoke")
    assert cel_error.value.status == 422
    assert "replicas must not exceed maxReplicas" in json.loads(cel_error.value.body)["message"]

    bad_schema = {**good, "metadata": {"name": "negative"}, "spec": {"replicas": -1, "maxReplicas": 2}}
    with pytest.raises(ApiException) as schema_error:
        widgets.server_side_apply(body=bad_schema, namespace=namespace, field_manager="kubeplane-smoke")
    assert schema_error.value.status == 422
    assert "spec.replicas" in json.loads(schema_error.value.body)["message"]
    crds.delete(name=CRD["metadata"]["name"])


def _find_resource(dyn: dynamic.DynamicClient) -> dynamic.Resource | None:
    try:
        return dyn.resources.get(api_version="smoke.kubeplane.test/v1", kind="Widget")
    except dynamic.exceptions.ResourceNotFoundError:
        dyn.resources.invalidate_cache()
        return None


def test_failure_injection_label_fails_a_running_pod(k8s: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(k8s)
    core.create_namespaced_pod(
        namespace,
        gpu_pod("doomed-engine", gpus=1, labels={"pod-container-running-failed.stage.kwok.x-k8s.io": "true"}),
    )

    def failed() -> client.V1Pod | None:
        pod = core.read_namespaced_pod("doomed-engine", namespace)
        return pod if pod.status.phase == "Failed" else None

    pod = wait_for(failed, what="pod Failed")
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 1
    assert terminated.reason == "containerFailed"


def test_services_get_loopback_cluster_ips(k8s: client.ApiClient, namespace: str) -> None:
    svc = client.CoreV1Api(k8s).create_namespaced_service(
        namespace, {"metadata": {"name": "api"}, "spec": {"selector": {"app": "x"}, "ports": [{"port": 80}]}}
    )
    assert ipaddress.ip_address(svc.spec.cluster_ip) in LOOPBACK


def pinned_version(module: str, path: str) -> str:
    go_mod = (paths.modules_dir() / module / "go.mod").read_text()
    match = re.search(rf"^(?:require)?\s*{re.escape(path)} (v\S+)", go_mod, re.MULTILINE)
    assert match, f"{path} not pinned in controlplane/modules/{module}/go.mod"
    return match.group(1)


def test_binaries_report_the_pinned_versions(local_cluster: kubeplane_cluster.LocalCluster) -> None:
    def run(*argv: str) -> str:
        return subprocess.run(
            argv, env=local_cluster.env(), check=True, capture_output=True, text=True, timeout=30
        ).stdout

    k8s = pinned_version("k8s", "k8s.io/kubernetes")
    version = json.loads(run("kubectl", "version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == k8s
    assert version["serverVersion"]["minor"] == k8s.split(".")[1]
    assert version["clientVersion"]["gitVersion"] == k8s
    assert run("helm", "version", "--template", "{{.Version}}") == pinned_version("helm", "helm.sh/helm/v4")
    assert pinned_version("kwok", "sigs.k8s.io/kwok") in run("kwok", "--version")
    assert pinned_version("etcd", "go.etcd.io/etcd/server/v3").lstrip("v") in run("etcd", "--version")


def test_components_only_listen_and_connect_on_loopback(local_cluster: kubeplane_cluster.LocalCluster) -> None:
    seen = 0
    for managed in local_cluster.processes:
        proc = psutil.Process(managed.pid)
        for conn in proc.net_connections(kind="inet"):
            seen += 1
            assert ipaddress.ip_address(conn.laddr.ip).is_loopback, (managed.name, conn)
            if conn.raddr:
                assert ipaddress.ip_address(conn.raddr.ip).is_loopback, (managed.name, conn)
    assert seen > 10  # etcd, apiserver, controllers and kwok all hold connections
