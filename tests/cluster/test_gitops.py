"""The GitOps contract on the real plane with the operator running: the examples re-applied by server-side apply
show an empty diff, the operator owns nothing under ``spec``, and the Argo CD health check reads live jobs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from explorer_operator import kube, models
from explorer_operator.local import LocalOperator
from kubeplane import cluster, paths
from tests.unit.test_gitops_files import argocd_health
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
EXAMPLES = sorted((paths.repo_root() / "examples").glob("*.yaml"))


def kubectl(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["kubectl", *argv], env=env, capture_output=True, text=True, timeout=120, check=False)


def jobs_in(k8s: client.ApiClient, namespace: str) -> list[dict[str, Any]]:
    listed = client.CustomObjectsApi(k8s).list_namespaced_custom_object(
        models.GROUP, models.VERSION, namespace, models.PLURAL
    )
    items: list[dict[str, Any]] = listed["items"]
    return items


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_reapplied_server_side_show_no_diff_and_the_operator_never_owns_spec(
    example: Path, local_cluster: cluster.LocalCluster, k8s: client.ApiClient, namespace: str,
    operator: LocalOperator,
) -> None:  # fmt: skip
    env = local_cluster.env()
    for _ in range(2):
        applied = kubectl(env, "apply", "--server-side", "--field-manager=gitops", "-n", namespace, "-f", str(example))
        assert applied.returncode == 0, applied.stderr
    reconciled = wait_for(lambda: [j for j in jobs_in(k8s, namespace) if j.get("status", {}).get("conditions")],
                          timeout=60, what="the operator to write status")  # fmt: skip
    # kubectl diff reads the live object and the dry-run result in two requests: a status write by the operator in
    # between (the job is starting) shows as a diff of status and resourceVersion. That passes; spec drift does not.
    for _ in range(10):
        diff = kubectl(env, "diff", "--server-side", "--field-manager=gitops", "-n", namespace, "-f", str(example))
        if diff.returncode == 0:
            break
        time.sleep(2)
    assert diff.returncode == 0 and diff.stdout == "", f"a GitOps tool would see drift:\n{diff.stdout}{diff.stderr}"

    for job in reconciled:
        meta = job["metadata"]
        ours = [m for m in meta["managedFields"] if m["manager"] == kube.FIELD_MANAGER]
        assert ours and all(m.get("subresource") == "status" for m in ours), json.dumps(ours)[:2000]
        assert "f:spec" not in json.dumps([m["fieldsV1"] for m in ours])
        assert not meta.get("finalizers")
        assert not [k for k in meta.get("annotations", {}) if "kopf" in k]
        # The live job (here: engines Pending on a missing model-cache claim, or Running) seen as Argo CD would.
        health = argocd_health(job)
        holds = {c["type"] for c in job["status"]["conditions"] if c["status"] == "True"}
        expected = "Degraded" if "Degraded" in holds else "Healthy" if "Ready" in holds else "Progressing"
        assert health["status"] == expected, (health, job["status"]["conditions"])
        if expected == "Degraded":
            degraded = next(c for c in job["status"]["conditions"] if c["type"] == "Degraded")
            assert health["message"] == degraded["message"]
