"""Fake GPU nodes for kwok: pure manifests, plus creating them and waiting until they can take pods."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from kubernetes import client

GPU_RESOURCE = "nvidia.com/gpu"
# Every address on the fake nodes is loopback: nothing can ever dial outside 127.0.0.0/8 through them.
NODE_IP_PREFIX = "127.63.0."
POD_CIDR_TEMPLATE = "127.64.{index}.0/24"


@dataclasses.dataclass(frozen=True)
class NodeShape:
    """What each fake node offers the scheduler."""

    gpus: int = 8
    cpu: str = "32"
    memory: str = "256Gi"
    pods: str = "110"
    gpu_product: str = "NVIDIA-H200"


def node_name(index: int) -> str:
    return f"kwok-gpu-{index}"


def node_ip(index: int) -> str:
    return f"{NODE_IP_PREFIX}{index + 1}"


def build_node(index: int, shape: NodeShape) -> dict[str, Any]:
    """The Node object (with status) for fake node ``index``."""
    name = node_name(index)
    capacity = {"cpu": shape.cpu, "memory": shape.memory, "pods": shape.pods}
    if shape.gpus:
        capacity[GPU_RESOURCE] = str(shape.gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true" if shape.gpus else "false",
                "nvidia.com/gpu.product": shape.gpu_product,
                "nvidia.com/gpu.count": str(shape.gpus),
            },
        },
        "spec": {
            "podCIDR": POD_CIDR_TEMPLATE.format(index=index),
            "podCIDRs": [POD_CIDR_TEMPLATE.format(index=index)],
        },
        "status": {
            "capacity": capacity,
            "allocatable": dict(capacity),
            "addresses": [
                {"type": "InternalIP", "address": node_ip(index)},
                {"type": "Hostname", "address": name},
            ],
        },
    }


def node_is_schedulable(node: client.V1Node) -> bool:
    """Ready=True and no taint left by the node lifecycle (not-ready/unreachable) on it."""
    conditions = (node.status.conditions or []) if node.status else []
    ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
    taints = (node.spec.taints or []) if node.spec else []
    return ready and not any(t.key.startswith("node.kubernetes.io/") for t in taints)


def create_nodes(api: client.CoreV1Api, count: int, shape: NodeShape, timeout: float = 60.0) -> list[str]:
    """Create ``count`` fake nodes and wait until the scheduler may place pods on every one."""
    names = []
    for index in range(count):
        body = build_node(index, shape)
        api.create_node(body)
        # Create may drop status on some versions: set it through the status subresource too.
        api.patch_node_status(body["metadata"]["name"], {"status": body["status"]})
        names.append(body["metadata"]["name"])
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        for node in api.list_node(label_selector="type=kwok").items:
            if node.metadata.name in pending and node_is_schedulable(node):
                pending.discard(node.metadata.name)
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"fake nodes not Ready and untainted after {timeout:.0f}s: {sorted(pending)}")
        time.sleep(0.2)
    return names
