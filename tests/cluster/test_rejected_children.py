"""Children the API server refuses (here: a ResourceQuota on GPUs): the job's status and events say so, the rest of the
job is built, the startup deadline still applies, and lifting the refusal lets the job recover."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cluster.test_operator import Jobs, job_manifest, jobs
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster
__all__ = ["jobs"]  # the fixture, shared with test_operator

QUOTA = "gpus"


def limit_gpus(jobs: Jobs, gpus: int) -> None:
    """A quota on the namespace's GPU requests, enforced once the quota controller has measured usage (before that,
    admission refuses every pod that requests GPUs for an unknown status)."""
    body = {"metadata": {"name": QUOTA}, "spec": {"hard": {"requests.nvidia.com/gpu": str(gpus)}}}
    jobs.core.create_namespaced_resource_quota(jobs.ns, body)
    wait_for(lambda: (q := jobs.core.read_namespaced_resource_quota(QUOTA, jobs.ns)).status and q.status.used,
             what="quota usage measured")  # fmt: skip


def degraded(jobs: Jobs, name: str, reason: str) -> dict[str, Any]:
    return wait_for(
        lambda: (c := jobs.condition(name, "Degraded")) and c["status"] == "True" and c["reason"] == reason and c,
        timeout=60,
        what=f"{name} Degraded/{reason}",
    )


def test_refused_engine_pods_show_in_status_and_events_and_the_job_recovers(jobs: Jobs) -> None:
    limit_gpus(jobs, 0)
    jobs.create(job_manifest("starved"))
    condition = degraded(jobs, "starved", "ChildRejected")
    for pod in ("starved-engine-0", "starved-engine-1"):
        assert f"Pod {pod} rejected: " in condition["message"]
    assert "exceeded quota: gpus" in condition["message"]
    warnings = wait_for(
        lambda: [e for e in jobs.events("starved") if e["reason"] == "ChildRejected" and e["type"] == "Warning"],
        what="ChildRejected event",
    )
    assert any("starved-engine-0" in e["note"] and "exceeded quota" in e["note"] for e in warnings)
    status = jobs.get("starved")["status"]
    assert status["phase"] in ("Pending", "Initializing") and status["engines"]["current"] == 0
    assert set(jobs.pods("starved")) == {"starved-coordinator"}  # the other children were still created
    assert jobs.core.read_namespaced_config_map("starved-config", jobs.ns)
    assert jobs.core.read_namespaced_service("starved-engines", jobs.ns)

    jobs.core.delete_namespaced_resource_quota(QUOTA, jobs.ns)
    jobs.wait_phase("starved", "Running", timeout=90)  # the refused pods are retried with backoff
    recovered = jobs.condition("starved", "Degraded")
    assert recovered is not None and recovered["status"] == "False"
    assert jobs.running_pods("starved") == {"starved-coordinator", "starved-engine-0", "starved-engine-1"}
    assert len([e for e in jobs.events("starved") if e["reason"] == "ChildRejected"]) == len(warnings)


def test_a_job_whose_pods_are_always_refused_fails_at_its_startup_deadline_naming_the_refusal(jobs: Jobs) -> None:
    limit_gpus(jobs, 2)  # one engine of two fits
    jobs.create(job_manifest("doomed", startupDeadlineSeconds=10))
    job = jobs.wait_phase("doomed", "Failed", timeout=60)
    failed = jobs.condition("doomed", "Failed")
    assert failed is not None and failed["reason"] == "StartupDeadlineExceeded"
    assert "rejected: " in failed["message"] and "exceeded quota: gpus" in failed["message"]
    assert job["status"]["engines"]["current"] <= 1
    wait_for(
        lambda: [e for e in jobs.events("doomed") if e["reason"] == "StartupDeadlineExceeded" and "quota" in e["note"]],
        what="StartupDeadlineExceeded event naming the quota",
    )
    wait_for(lambda: not jobs.pods("doomed"), what="pods of the failed job removed")
