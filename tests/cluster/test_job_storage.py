"""Job storage on the real local plane: the claim the operator makes, binds through the real PV controller, outlives
the job under Retain and is reused by a job of the same name; the API server keeps it immutable; a claim that cannot
bind is named in status."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml
from kubernetes import client

from explorer_operator import builders, models
from explorer_operator.local import LocalOperator
from kubeplane import cluster as kubeplane_cluster
from tests.cluster.test_operator import Jobs, job_manifest
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster


@pytest.fixture
def jobs(
    k8s: client.ApiClient, namespace: str, operator: LocalOperator, local_cluster: kubeplane_cluster.LocalCluster
) -> Jobs:
    return Jobs(k8s, namespace, local_cluster.env())


def static_volume(core: client.CoreV1Api, namespace: str, claim: str) -> str:
    """A PersistentVolume bound ahead to ``claim`` (the plane has no provisioner; kwok pods never mount it)."""
    name = f"{namespace}-{claim}"[:63]
    core.create_persistent_volume({
        "metadata": {"name": name},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"], "storageClassName": "manual",
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/srv/never-mounted/{name}"},
                 "claimRef": {"namespace": namespace, "name": claim}},
    })  # fmt: skip
    return name


def claim_of(jobs: Jobs, name: str) -> client.V1PersistentVolumeClaim | None:
    try:
        return jobs.core.read_namespaced_persistent_volume_claim(name, jobs.ns)
    except client.ApiException as err:
        if err.status == 404:
            return None
        raise


def apply(local_cluster: kubeplane_cluster.LocalCluster, namespace: str, manifest: dict[str, Any]) -> str:
    out = subprocess.run(["kubectl", "apply", "-n", namespace, "-f", "-"], input=yaml.safe_dump(manifest), text=True,
                         env=local_cluster.env(), capture_output=True, timeout=30, check=False)  # fmt: skip
    return out.stderr if out.returncode else ""


STORAGE = {"claimTemplate": {"size": "1Gi", "storageClassName": "manual"}}


def test_the_claim_binds_is_mounted_outlives_the_job_and_is_reused(
    jobs: Jobs, local_cluster: kubeplane_cluster.LocalCluster
) -> None:
    pv = static_volume(jobs.core, jobs.ns, "kept-data")
    try:
        first = jobs.create(job_manifest("kept", storage=STORAGE))
        jobs.wait_phase("kept", "Running")
        claim = wait_for(lambda: (c := claim_of(jobs, "kept-data")) and c.status.phase == "Bound" and c, timeout=60,
                         what="the job's claim bound")  # fmt: skip
        assert claim.metadata.owner_references is None  # whenDeleted: Retain (the default)
        assert claim.metadata.labels[builders.JOB_LABEL] == "kept" and claim.spec.volume_name == pv
        coordinator = jobs.pods("kept")["kept-coordinator"]
        volume = next(v for v in coordinator.spec.volumes if v.name == builders.STORAGE_VOLUME)
        assert volume.persistent_volume_claim.claim_name == "kept-data"

        jobs.api.delete_namespaced_custom_object(models.GROUP, models.VERSION, jobs.ns, models.PLURAL, "kept")
        wait_for(lambda: not jobs.pods("kept"), timeout=60, what="the job's pods garbage-collected")
        kept = claim_of(jobs, "kept-data")
        assert kept is not None and kept.metadata.uid == claim.metadata.uid and kept.status.phase == "Bound"

        second = jobs.create(job_manifest("kept", storage=STORAGE))
        assert second["metadata"]["uid"] != first["metadata"]["uid"]
        jobs.wait_phase("kept", "Running")
        reused = claim_of(jobs, "kept-data")
        assert reused is not None and reused.metadata.uid == claim.metadata.uid
        degraded = jobs.condition("kept", "Degraded")
        assert degraded is not None and degraded["status"] == "False", degraded  # reused, not a conflict

        grown = {"claimTemplate": {"size": "2Gi", "storageClassName": "manual"}}
        refused = apply(local_cluster, jobs.ns, job_manifest("kept", storage=grown))
        assert "storage.claimTemplate is immutable" in refused, refused
        with pytest.raises(client.ApiException) as switched:
            jobs.patch_spec("kept", {"storage": {"claimTemplate": None, "existingClaim": "other"}})
        assert "cannot switch between claimTemplate and existingClaim" in str(switched.value.body), switched.value
    finally:
        jobs.core.delete_persistent_volume(pv)


def test_a_claim_under_delete_goes_with_its_job(jobs: Jobs) -> None:
    pv = static_volume(jobs.core, jobs.ns, "gone-data")
    try:
        jobs.create(job_manifest("gone", storage={**STORAGE, "retentionPolicy": {"whenDeleted": "Delete"}}))
        claim = wait_for(lambda: claim_of(jobs, "gone-data"), timeout=60, what="the job's claim")
        assert [r.kind for r in claim.metadata.owner_references] == [models.KIND]
        jobs.api.delete_namespaced_custom_object(models.GROUP, models.VERSION, jobs.ns, models.PLURAL, "gone")
        wait_for(lambda: claim_of(jobs, "gone-data") is None, timeout=90, what="the claim garbage-collected")
    finally:
        jobs.core.delete_persistent_volume(pv)


def test_storage_that_cannot_work_is_named(jobs: Jobs, local_cluster: kubeplane_cluster.LocalCluster) -> None:
    both = apply(local_cluster, jobs.ns, job_manifest("both", storage={**STORAGE, "existingClaim": "x"}))
    assert "storage needs exactly one of claimTemplate and existingClaim" in both, both

    jobs.create(job_manifest("nowhere", storage={"claimTemplate": {"storageClassName": "no-such-class"}}))
    degraded = wait_for(lambda: (c := jobs.condition("nowhere", "Degraded")) and c["reason"] == "ClaimNotBound" and c,
                        timeout=60, what="ClaimNotBound")  # fmt: skip
    assert "nowhere-data" in degraded["message"] and "no-such-class" in degraded["message"]

    jobs.create(job_manifest("missing", storage={"existingClaim": "never-made"}))
    degraded = wait_for(lambda: (c := jobs.condition("missing", "Degraded")) and c["reason"] == "ClaimNotFound" and c,
                        timeout=60, what="ClaimNotFound")  # fmt: skip
    assert "spec.storage.existingClaim" in degraded["message"] and "never-made" in degraded["message"]
