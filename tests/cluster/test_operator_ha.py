"""Two operator replicas with Lease leader election, in namespace-scoped mode, on a plane of their own."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import pytest
from kubernetes import client

from explorer_operator import models
from explorer_operator.local import LocalOperator, running_operator
from kubeplane import cluster, paths
from tests.cluster.test_operator import job_manifest
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster


def replica(local: cluster.LocalCluster, log: Path) -> contextlib.AbstractContextManager[LocalOperator]:
    return running_operator(local, log, scope=("--namespace", "ha", "--leader-elect-namespace", "ha"))


def test_only_the_leader_reconciles_and_a_follower_takes_over(tmp_path: Path) -> None:
    with cluster.LocalCluster(cluster.ClusterConfig(nodes=2)) as local:
        env = local.env()
        subprocess.run(["kubectl", "apply", "--server-side", "-f", str(paths.repo_root() / "crds")], env=env,
                       check=True, capture_output=True, timeout=60)  # fmt: skip
        subprocess.run(["kubectl", "wait", "--for=condition=Established", "crd/explorerjobs.explorer.rft.dev"],
                       env=env, check=True, capture_output=True, timeout=60)  # fmt: skip
        api = local.api_client()
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        for ns in ("ha", "elsewhere"):
            core.create_namespace({"metadata": {"name": ns}})
        with replica(local, tmp_path / "a.log") as first_operator:
            first = first_operator.process
            lease = wait_for(lambda: _lease_holder(api), timeout=60, what="a leader")
            with replica(local, tmp_path / "b.log") as second_operator:
                second = second_operator.process
                time.sleep(3)
                assert _lease_holder(api) == lease  # the second replica follows
                custom.create_namespaced_custom_object(models.GROUP, models.VERSION, "ha", models.PLURAL,
                                                       job_manifest("one", engines={"replicas": 1}))  # fmt: skip
                custom.create_namespaced_custom_object(models.GROUP, models.VERSION, "elsewhere", models.PLURAL,
                                                       job_manifest("ignored", engines={"replicas": 1}))  # fmt: skip
                wait_for(lambda: _phase(custom, "ha", "one") == "Running", what="job reconciled by the leader")
                writers = {e["userAgent"] for e in local.audit_events() if e["verb"] == "patch"
                           and e["userAgent"].startswith("explorer-operator")}  # fmt: skip
                assert writers == {f"explorer-operator/0.1.0 ({lease})"}  # the leader alone wrote

                first.terminate()  # the leader goes away; its lease expires and the follower takes it
                first.wait(timeout=30)
                wait_for(lambda: (h := _lease_holder(api)) and h != lease, timeout=60, what="follower takes the lease")
                custom.create_namespaced_custom_object(models.GROUP, models.VERSION, "ha", models.PLURAL,
                                                       job_manifest("two", engines={"replicas": 1}))  # fmt: skip
                wait_for(lambda: _phase(custom, "ha", "two") == "Running", what="job reconciled by the new leader")
                assert second.poll() is None
            assert _phase(custom, "elsewhere", "ignored") is None  # namespace-scoped: never touched
            assert not core.list_namespaced_pod("elsewhere").items


def _lease_holder(api: client.ApiClient) -> str | None:
    try:
        lease = client.CoordinationV1Api(api).read_namespaced_lease("explorer-operator", "ha")
    except client.ApiException:
        return None
    holder: str | None = lease.spec.holder_identity
    return holder


def _phase(custom: client.CustomObjectsApi, namespace: str, name: str) -> str | None:
    job = custom.get_namespaced_custom_object(models.GROUP, models.VERSION, namespace, models.PLURAL, name)
    phase: str | None = (job.get("status") or {}).get("phase")
    return phase
