"""Ownership by UID on the real plane: a label is not ownership, a job recreated under an old name inherits nothing,
and an object the job does not own is never overwritten or deleted."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from explorer_operator import builders, models
from tests.cluster.test_operator import Jobs, job_manifest, jobs
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
__all__ = ["jobs"]  # the fixture, shared with test_operator


def conflict(jobs: Jobs, name: str, child: str) -> dict[str, Any]:
    """The job's Degraded condition once it names ``child`` (e.g. "Pod x-engine-1") as a conflict."""
    expected = f"{child} not written: exists and is not owned by this job"

    def reported() -> dict[str, Any] | None:
        c = jobs.condition(name, "Degraded")
        return c if c and c["reason"] == "ChildConflict" and expected in c["message"] else None

    return wait_for(reported, timeout=60, what=f"{name} reporting {child} as a conflict")


def conflict_events(jobs: Jobs, name: str) -> list[dict[str, Any]]:
    return [e for e in jobs.events(name) if e["reason"] == "ChildConflict" and e["type"] == "Warning"]


def hand_made_engine(jobs: Jobs, job: str, index: int) -> client.V1Pod:
    """A pod with every label of the job's engine ``index`` but no owner reference, running."""
    group = {builders.GROUP_LABEL: builders.ROLLOUT_GROUP, builders.INDEX_LABEL: str(index)}
    labels = builders.labels(builders.JobRef(job, jobs.ns, ""), "engine", **group)
    name = f"{job}-engine-{index}"
    jobs.core.create_namespaced_pod(jobs.ns, {
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "engine", "image": "registry.invalid/hand-made:1"}]},
    })  # fmt: skip
    return wait_for(
        lambda: (p := jobs.core.read_namespaced_pod(name, jobs.ns)).status.phase == "Running" and p,
        what=f"{name} running",
    )


def owner_uids(obj: Any) -> list[str]:
    return [r.uid for r in obj.metadata.owner_references or []]


def test_a_pod_that_merely_carries_the_jobs_labels_is_neither_deleted_nor_counted(jobs: Jobs) -> None:
    squatter = hand_made_engine(jobs, "stray", 1)  # holds the name of an engine the job needs
    extra = hand_made_engine(jobs, "stray", 9)  # a name the job does not need: not "scaled down"
    jobs.create(job_manifest("stray"))
    conflict(jobs, "stray", "Pod stray-engine-1")
    wait_for(lambda: jobs.running_pods("stray") >= {"stray-coordinator", "stray-engine-0"}, what="own pods running")
    wait_for(lambda: jobs.get("stray")["status"]["engines"]["ready"] == 1, what="the job's own engine counted")
    job = jobs.get("stray")
    assert job["status"]["engines"]["current"] == 1 and job["status"]["phase"] == "Initializing"
    ready = jobs.condition("stray", "Ready")
    assert ready is not None and ready["status"] == "False" and "stray-engine-1" in ready["message"]
    assert wait_for(lambda: conflict_events(jobs, "stray"), what="ChildConflict event")

    jobs.core.delete_namespaced_pod("stray-engine-1", jobs.ns, grace_period_seconds=0)
    wait_for(lambda: (p := jobs.pods("stray").get("stray-engine-1")) and p.metadata.uid != squatter.metadata.uid,
             what="the job's own engine-1")  # fmt: skip
    job = jobs.wait_phase("stray", "Running")
    assert job["status"]["engines"]["current"] == 2
    assert jobs.core.read_namespaced_pod("stray-engine-9", jobs.ns).metadata.uid == extra.metadata.uid
    assert owner_uids(jobs.pods("stray")["stray-engine-1"]) == [job["metadata"]["uid"]]


def test_a_job_recreated_under_the_same_name_inherits_nothing_from_its_predecessor(jobs: Jobs) -> None:
    old = jobs.create(job_manifest("reborn", onCompletion="KeepAll"))
    jobs.wait_phase("reborn", "Running")
    jobs.core.patch_namespaced_pod_status("reborn-coordinator", jobs.ns, {"status": {"phase": "Succeeded"}})
    jobs.wait_phase("reborn", "Succeeded")
    before = {n: p.metadata.uid for n, p in jobs.pods("reborn").items()}
    assert set(before) == {"reborn-coordinator", "reborn-engine-0", "reborn-engine-1"}
    where = (models.GROUP, models.VERSION, jobs.ns, models.PLURAL)
    jobs.api.delete_namespaced_custom_object(*where, "reborn", propagation_policy="Orphan")
    wait_for(lambda: not jobs.api.list_namespaced_custom_object(*where)["items"], what="old job gone")
    assert all(not owner_uids(p) for p in jobs.pods("reborn").values())  # orphaned, still labelled

    new = jobs.create(job_manifest("reborn", onCompletion="KeepAll"))
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    condition = conflict(jobs, "reborn", "Pod reborn-coordinator")
    assert "Pod reborn-engine-0 not written" in condition["message"]
    job = jobs.get("reborn")
    assert job["status"]["phase"] == "Pending"  # not Succeeded, not Running: the old pods are not its own
    assert (job["status"]["engines"]["current"], job["status"]["engines"]["ready"]) == (0, 0)
    ready = jobs.condition("reborn", "Ready")
    assert ready is not None and ready["status"] == "False"
    assert {n: p.metadata.uid for n, p in jobs.pods("reborn").items()} == before  # nothing of theirs deleted

    selector = f"{builders.JOB_LABEL}=reborn"
    for pod in before:
        jobs.core.delete_namespaced_pod(pod, jobs.ns, grace_period_seconds=0)
    jobs.core.delete_collection_namespaced_config_map(jobs.ns, label_selector=selector)
    for service in jobs.core.list_namespaced_service(jobs.ns, label_selector=selector).items:
        jobs.core.delete_namespaced_service(service.metadata.name, jobs.ns)
    client.NetworkingV1Api(jobs.core.api_client).delete_collection_namespaced_network_policy(
        jobs.ns, label_selector=selector
    )
    job = jobs.wait_phase("reborn", "Running", timeout=90)
    for pod in jobs.pods("reborn").values():
        assert owner_uids(pod) == [new["metadata"]["uid"]]


def test_an_unowned_config_map_named_like_the_jobs_is_not_overwritten(jobs: Jobs) -> None:
    theirs = jobs.core.create_namespaced_config_map(
        jobs.ns, {"metadata": {"name": "claimed-config"}, "data": {"explorer.yaml": "someone else's"}}
    )
    jobs.create(job_manifest("claimed"))
    condition = conflict(jobs, "claimed", "ConfigMap claimed-config")
    assert "no controller" in condition["message"]
    events = wait_for(lambda: conflict_events(jobs, "claimed"), what="ChildConflict event")
    assert any("ConfigMap claimed-config" in e["note"] for e in events)
    wait_for(lambda: "claimed-coordinator" in jobs.pods("claimed"), what="the rest of the job built")
    assert jobs.core.read_namespaced_service("claimed-sync", jobs.ns)
    now = jobs.core.read_namespaced_config_map("claimed-config", jobs.ns)
    assert now.metadata.resource_version == theirs.metadata.resource_version  # never written to
    assert now.data == {"explorer.yaml": "someone else's"} and not now.metadata.owner_references
