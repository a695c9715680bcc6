"""The user's whole stack on a local plane with real nodes: the chart-installed operator pod, a model volume, the
CPU example job and a reference-trainer pod. ``make demo`` and the end-to-end tests both build it from here."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from explorer import credentials
from explorer_operator import builders
from kubeplane import cluster, images, nodeconfig, paths

OPERATOR_NAMESPACE = "explorer-system"
CPU_JOB = paths.repo_root() / "examples" / "local" / "cpu-job.yaml"
TRAINER_SCRIPT = paths.repo_root() / "examples" / "local" / "trainer.py"
OPERATOR_VALUES = paths.repo_root() / "examples" / "local" / "operator-values.yaml"
TRAINER_LABEL = "explorer.rft.dev/trainer-for"
MODEL_CLAIM = "model-cache"
# What Pod Security "restricted" asks of every container (the trainer pod, and the tests' own pods).
RESTRICTED_CONTAINER: dict[str, Any] = {
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
}
ON_REAL_NODES: dict[str, Any] = {
    "nodeSelector": {nodeconfig.REAL_NODE_LABEL: "true"},
    "tolerations": [{"key": nodeconfig.REAL_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
}


class StackError(RuntimeError):
    """A step failed; the message carries the failing command and its stderr."""


def run(plane: cluster.LocalCluster, argv: list[str], stdin: str | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(
        argv, env=plane.env(), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise StackError(f"{' '.join(argv[:4])} ... exited {proc.returncode}:\n{proc.stderr.strip()}")
    return proc.stdout


def kubectl(plane: cluster.LocalCluster, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
    return run(plane, ["kubectl", *args], stdin=stdin, timeout=timeout)


def install_operator(plane: cluster.LocalCluster) -> None:
    """``helm install`` of the chart with the locally built operator image, its pods on the real nodes."""
    chart = paths.repo_root() / "helm" / "explorer-operator"
    run(
        plane,
        [
            "helm",
            "upgrade",
            "--install",
            "explorer-operator",
            str(chart),
            "--namespace",
            OPERATOR_NAMESPACE,
            "--create-namespace",
            "-f",
            str(OPERATOR_VALUES),
            "--wait",
            "--timeout",
            "300s",
        ],
        timeout=330,
    )


def uninstall_operator(plane: cluster.LocalCluster) -> None:
    subprocess.run(
        ["helm", "uninstall", "explorer-operator", "-n", OPERATOR_NAMESPACE],
        env=plane.env(),
        capture_output=True,
        timeout=120,
        check=False,
    )


RESTRICTED_NAMESPACE = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn")}


def experiences_per_push(job: dict[str, Any]) -> int:
    """What the explorer commits between two syncs of a ``fixed``-style job: the trainer's batch."""
    explore, sync = job["spec"]["explore"], job["spec"]["sync"]
    return int(sync.get("interval", 1) * explore["batchSize"] * explore.get("repeatTimes", 1))


def enforce_restricted(plane: cluster.LocalCluster, namespace: str) -> None:
    """Pod Security "restricted" on the namespace: the API server refuses any pod (ours too) that asks for more."""
    labels = [f"{k}={v}" for k, v in RESTRICTED_NAMESPACE.items()]
    kubectl(plane, "label", "namespace", namespace, *labels, "--overwrite")


def model_volume(plane: cluster.LocalCluster, namespace: str) -> Path:
    """The tiny model made locally on a ``local`` PersistentVolume of the real nodes, claimed as ``model-cache``."""
    from explorer import tiny_model

    assert plane.workdir is not None
    root = plane.workdir / "volumes" / namespace
    model_dir = tiny_model.make_tiny_model(root / "tiny")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # pods run as non-root users
    pv_name = f"{namespace}-models"
    terms = [{"matchExpressions": [{"key": nodeconfig.REAL_NODE_LABEL, "operator": "In", "values": ["true"]}]}]
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadOnlyMany"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "local-models",
            "local": {"path": str(root)},
            "claimRef": {"namespace": namespace, "name": MODEL_CLAIM},
            "nodeAffinity": {"required": {"nodeSelectorTerms": terms}},
        },
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": MODEL_CLAIM, "namespace": namespace},
        "spec": {
            "accessModes": ["ReadOnlyMany"],
            "storageClassName": "local-models",
            "volumeName": pv_name,
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }
    kubectl(plane, "apply", "-f", "-", stdin="\n---\n".join(json.dumps(o) for o in (pv, pvc)))
    return model_dir


STORAGE_CLASS = "local-explorer"  # the example job's claimTemplate asks for this class; no provisioner serves it


def job_storage(plane: cluster.LocalCluster, namespace: str, job: str) -> Path:
    """A ``local`` PersistentVolume on the real node, bound ahead to the claim ``<job>-data`` that the operator makes
    from the example job's ``storage.claimTemplate`` (the plane has no provisioner). Returns its host directory: the
    experience log, its manifest and the resume state land there."""
    assert plane.workdir is not None
    root = plane.workdir / "storage" / namespace / f"{job}-data"
    root.mkdir(parents=True, exist_ok=True)
    # A local volume keeps the host's ownership: let the coordinator's user write (the directory is inside the
    # plane's private workdir).
    os.chown(root, builders.RUN_AS, builders.RUN_AS)
    root.chmod(0o777)
    terms = [{"matchExpressions": [{"key": nodeconfig.REAL_NODE_LABEL, "operator": "In", "values": ["true"]}]}]
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{namespace}-{job}-data"},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "local": {"path": str(root)},
            "claimRef": {"namespace": namespace, "name": f"{job}-data"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": terms}},
        },
    }
    kubectl(plane, "apply", "-f", "-", stdin=json.dumps(pv))
    return root


def trainer_objects(
    job: str, address: str, name: str = "trainer", pushes: int = 1, seed: int = 7, interval: float = 0.0, batch: int = 0
) -> list[dict[str, Any]]:
    """The reference trainer as a pod (its script in a ConfigMap): labelled as the job's trainer, nothing else;
    ``batch``: experiences it reads from the job's stream before each push."""
    args = [
        "--address",
        address,
        "--batch",
        str(batch),
        "--model",
        "/models/tiny",
        "--pushes",
        str(pushes),
        "--seed",
        str(seed),
        "--interval",
        str(interval),
    ]
    container = {
        "name": "trainer",
        "image": images.RUNTIME_CPU_REF,
        "imagePullPolicy": "Never",
        "command": ["python3", "/trainer/trainer.py", *args],
        # The job's trainer token, from the Secret the operator made (status.sync.credentialsSecret).
        "env": [
            {
                "name": credentials.CLIENT_TOKEN_ENV,
                "valueFrom": {"secretKeyRef": {"name": f"{job}-credentials", "key": credentials.TRAINER_TOKEN}},
            }
        ],
        "volumeMounts": [
            {"name": "code", "mountPath": "/trainer"},
            {"name": "models", "mountPath": "/models", "readOnly": True},
        ],
        **RESTRICTED_CONTAINER,
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": f"{name}-code"},
            "data": {"trainer.py": TRAINER_SCRIPT.read_text()},
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {TRAINER_LABEL: job}},
            "spec": {
                **ON_REAL_NODES,
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "containers": [container],
                "volumes": [
                    {"name": "code", "configMap": {"name": f"{name}-code"}},
                    {"name": "models", "persistentVolumeClaim": {"claimName": MODEL_CLAIM, "readOnly": True}},
                ],
            },
        },
    ]


def apply(plane: cluster.LocalCluster, namespace: str, objects: list[dict[str, Any]]) -> None:
    kubectl(plane, "apply", "-n", namespace, "-f", "-", stdin="\n---\n".join(json.dumps(o) for o in objects))


def job_status(plane: cluster.LocalCluster, namespace: str, job: str) -> dict[str, Any]:
    out = kubectl(plane, "get", "ej", job, "-n", namespace, "-o", "json")
    return dict(json.loads(out).get("status") or {})
