"""Job storage (spec.storage) as pure functions: the claim, the coordinator's mount, ownership and the reasons a
job waits on its storage."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from explorer_operator import builders, models, planner, world

JOB = builders.JobRef(name="rl", namespace="team", uid="uid-1")
NOW = datetime.datetime(2026, 11, 29, 8, 0, 0, tzinfo=datetime.UTC)
TEMPLATE = {"claimTemplate": {"size": "5Gi", "storageClassName": "fast", "accessModes": ["ReadWriteOncePod"]}}


def spec(storage: dict[str, Any] | None, **overrides: Any) -> models.ExplorerJobSpec:
    body: dict[str, Any] = {"model": {"path": "/models/m"}, "engines": {"replicas": 1},
                            "taskset": {"path": "/data/t.jsonl"}, **overrides}  # fmt: skip
    if storage is not None:
        body["storage"] = storage
    return models.ExplorerJobSpec.model_validate(body)


def coordinator(s: models.ExplorerJobSpec) -> dict[str, Any]:
    return builders.build_coordinator_pod(JOB, s)


def rendered_config(s: models.ExplorerJobSpec) -> dict[str, Any]:
    config_map = builders.build_config_map(JOB, s)
    return dict(yaml.safe_load(config_map["data"][builders.CONFIG_FILE]))


def observed(s: models.ExplorerJobSpec, claim_phase: str | None, coordinator_status: dict[str, Any]) -> world.Observed:
    children = builders.build_static_children(JOB, s)
    pods = {n: copy.deepcopy(p) for n, p in builders.build_desired_pods(JOB, s).items()}
    pods["rl-coordinator"]["status"] = coordinator_status
    claims = {}
    for claim in (c for c in children if c["kind"] == "PersistentVolumeClaim"):
        claims[claim["metadata"]["name"]] = {**claim, "status": {"phase": claim_phase}}
    return world.Observed(
        pods=pods,
        services={c["metadata"]["name"]: c for c in children if c["kind"] == "Service"},
        config_maps={c["metadata"]["name"]: c for c in children if c["kind"] == "ConfigMap"},
        network_policies={c["metadata"]["name"]: c for c in children if c["kind"] == "NetworkPolicy"},
        claims=claims,
    )


UNSCHEDULED = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
               "reason": "Unschedulable", "message": "pod has unbound immediate PersistentVolumeClaims"}]}  # fmt: skip


def degraded(result: world.Plan) -> dict[str, Any]:
    return next(c for c in result.status["conditions"] if c["type"] == "Degraded")


def test_a_claim_template_becomes_the_jobs_claim_mounted_by_the_coordinator_with_the_log_on_it() -> None:
    s = spec(TEMPLATE)
    (claim,) = [c for c in builders.build_static_children(JOB, s) if c["kind"] == "PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "rl-data"
    assert claim["spec"] == {"accessModes": ["ReadWriteOncePod"], "resources": {"requests": {"storage": "5Gi"}},
                             "storageClassName": "fast"}  # fmt: skip
    pod = coordinator(s)
    assert {"name": builders.STORAGE_VOLUME, "persistentVolumeClaim": {"claimName": "rl-data"}} in pod["spec"][
        "volumes"
    ]
    (container,) = pod["spec"]["containers"]
    assert {"name": builders.STORAGE_VOLUME, "mountPath": builders.STORAGE_DIR} in container["volumeMounts"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert rendered_config(s)["experiences"]["path"] == f"{builders.STORAGE_DIR}/experiences"
    empty = world.Observed(pods={}, services={}, config_maps={})
    first = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), empty, NOW)
    assert [o["metadata"]["name"] for o in first.applies if o["kind"] == "PersistentVolumeClaim"] == ["rl-data"]


def test_without_storage_the_coordinator_keeps_its_writable_root_and_the_users_path() -> None:
    s = spec(None)
    assert not [c for c in builders.build_static_children(JOB, s) if c["kind"] == "PersistentVolumeClaim"]
    (container,) = coordinator(s)["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is False
    assert rendered_config(s)["experiences"]["path"] == builders.DEFAULT_EXPERIENCES_PATH
    chosen = spec(TEMPLATE, experiences={"path": "/mnt/shared/exp"})
    assert rendered_config(chosen)["experiences"]["path"] == "/mnt/shared/exp"


def test_an_existing_claim_is_mounted_and_never_made() -> None:
    s = spec({"existingClaim": "team-data"})
    assert not [c for c in builders.build_static_children(JOB, s) if c["kind"] == "PersistentVolumeClaim"]
    volumes = coordinator(s)["spec"]["volumes"]
    assert {"name": builders.STORAGE_VOLUME, "persistentVolumeClaim": {"claimName": "team-data"}} in volumes


@pytest.mark.parametrize("storage", [{}, {"existingClaim": "x", **TEMPLATE}])
def test_storage_needs_exactly_one_claim(storage: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="exactly one of claimTemplate and existingClaim"):
        spec(storage)


def test_retention_decides_whether_the_job_owns_its_claim() -> None:
    retained = builders.build_claim(JOB, spec(TEMPLATE))
    deleted = builders.build_claim(JOB, spec({**TEMPLATE, "retentionPolicy": {"whenDeleted": "Delete"}}))
    assert retained is not None and deleted is not None
    assert "ownerReferences" not in retained["metadata"]
    assert deleted["metadata"]["ownerReferences"] == [builders.owner_reference(JOB)]
    assert builders.template_hash(retained) != builders.template_hash(deleted)  # a policy change is applied


def test_a_retained_claim_of_an_earlier_job_of_this_name_is_reused_but_anothers_claim_is_a_conflict() -> None:
    retained = builders.build_claim(JOB, spec(TEMPLATE))
    assert retained is not None
    later_job = "uid-2"
    seen = world.observe(later_job, {"PersistentVolumeClaim": {"rl-data": retained}})
    assert "rl-data" in seen.claims and not seen.foreign
    theirs = copy.deepcopy(retained)
    theirs["metadata"]["ownerReferences"] = [{**builders.owner_reference(JOB), "kind": "StatefulSet", "uid": "x"}]
    seen = world.observe(later_job, {"PersistentVolumeClaim": {"rl-data": theirs}})
    assert not seen.claims and ("PersistentVolumeClaim", "rl-data") in seen.foreign
    unlabelled = copy.deepcopy(retained)
    del unlabelled["metadata"]["labels"][builders.MANAGED_BY]
    assert not world.is_ours("PersistentVolumeClaim", unlabelled, later_job)


def test_a_claim_waiting_for_a_volume_holds_the_coordinator_up_under_its_own_reason() -> None:
    s = spec(TEMPLATE)
    result = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), observed(s, "Pending", UNSCHEDULED), NOW)
    assert degraded(result)["reason"] == "ClaimNotBound"
    assert "rl-data" in degraded(result)["message"] and "fast" in degraded(result)["message"]
    scheduled = {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}]}
    result = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), observed(s, "Pending", scheduled), NOW)
    assert degraded(result)["reason"] != "ClaimNotBound"  # WaitForFirstConsumer: binding follows scheduling


def test_a_lost_claim_says_the_data_is_gone() -> None:
    s = spec(TEMPLATE)
    running = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}
    result = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), observed(s, "Lost", running), NOW)
    assert degraded(result)["reason"] == "ClaimLost" and "lost its PersistentVolume" in degraded(result)["message"]


def test_a_missing_existing_claim_is_named_with_what_to_fix() -> None:
    s = spec({"existingClaim": "team-data"})
    result = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), observed(s, None, UNSCHEDULED), NOW)
    assert degraded(result)["reason"] == "ClaimNotFound"
    assert "spec.storage.existingClaim" in degraded(result)["message"] and "team-data" in degraded(result)["message"]
