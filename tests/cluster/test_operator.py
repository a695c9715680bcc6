"""The operator against the real local plane, run as a subprocess: every behaviour observed through the API."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client

from explorer import config as explorer_config
from explorer import status_api
from explorer_operator import builders, models
from explorer_operator.local import LocalOperator
from kubeplane import cluster as kubeplane_cluster
from tests.conftest import free_port
from tests.waiting import wait_for

pytestmark = pytest.mark.cluster

FAIL_LABEL = "pod-container-running-failed.stage.kwok.x-k8s.io"


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"path": "/models/tiny", "tensorParallelSize": 2},
        "engines": {"replicas": 2},
        "taskset": {"path": "/data/train.jsonl"},
        "restartPolicy": {"maxRestarts": 3, "backoffSeconds": 1, "maxBackoffSeconds": 4},
    }
    base.update(spec)
    return {"apiVersion": models.API_VERSION, "kind": models.KIND, "metadata": {"name": name}, "spec": base}


class Jobs:
    def __init__(self, k8s: client.ApiClient, namespace: str, env: dict[str, str]):
        self.env = env
        self.api = client.CustomObjectsApi(k8s)
        self.core = client.CoreV1Api(k8s)
        self.ns = namespace

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.api.create_namespaced_custom_object(
            models.GROUP, models.VERSION, self.ns, models.PLURAL, manifest
        )
        return result

    def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.api.get_namespaced_custom_object(
            models.GROUP, models.VERSION, self.ns, models.PLURAL, name
        )
        return result

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object(
            models.GROUP, models.VERSION, self.ns, models.PLURAL, name, {"spec": spec}
        )

    def condition(self, name: str, type_: str) -> dict[str, Any] | None:
        for cond in self.get(name).get("status", {}).get("conditions", []):
            if cond["type"] == type_:
                return dict(cond)
        return None

    def pods(self, name: str) -> dict[str, client.V1Pod]:
        pods = self.core.list_namespaced_pod(self.ns, label_selector=f"{builders.JOB_LABEL}={name}").items
        return {p.metadata.name: p for p in pods if p.metadata.deletion_timestamp is None}

    def events(self, regarding: str) -> list[dict[str, Any]]:
        """events.k8s.io/v1 events about one object, raw (the typed client rejects some core events)."""
        out = subprocess.run(
            ["kubectl", "get", "events.events.k8s.io", "-n", self.ns, "-o", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        return [e for e in json.loads(out)["items"] if e["regarding"]["name"] == regarding]

    def running_pods(self, name: str) -> set[str]:
        return {n for n, p in self.pods(name).items() if p.status.phase == "Running"}

    def wait_phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(
            lambda: (j := self.get(name)).get("status", {}).get("phase") == phase and j,
            timeout=timeout,
            what=f"{name} phase {phase}",
        )


@pytest.fixture
def jobs(
    k8s: client.ApiClient, namespace: str, operator: LocalOperator, local_cluster: kubeplane_cluster.LocalCluster
) -> Jobs:
    return Jobs(k8s, namespace, local_cluster.env())


def test_job_creates_its_children_with_owner_references_and_runs(jobs: Jobs, local_cluster: Any) -> None:
    created = jobs.create(job_manifest("demo"))
    job = jobs.wait_phase("demo", "Running")
    assert jobs.running_pods("demo") == {"demo-coordinator", "demo-engine-0", "demo-engine-1"}
    status = job["status"]
    assert status["engines"] == {
        "desired": 2,
        "current": 2,
        "ready": 2,
        "inSync": 0,
        "selector": builders.engine_selector(builders.JobRef("demo", jobs.ns, "")),
    }
    assert status["sync"]["address"] == f"demo-sync.{jobs.ns}.svc:29500"
    ready = jobs.condition("demo", "Ready")
    assert ready is not None and ready["status"] == "True" and ready["observedGeneration"] == 1

    uid = created["metadata"]["uid"]
    pods = jobs.pods("demo")
    services = {s.metadata.name: s for s in jobs.core.list_namespaced_service(jobs.ns).items}
    config_map = jobs.core.read_namespaced_config_map("demo-config", jobs.ns)
    for obj in [*pods.values(), *services.values(), config_map]:
        assert [(r.kind, r.uid, r.controller) for r in obj.metadata.owner_references] == [(models.KIND, uid, True)]
    sync = services["demo-sync"].spec
    assert sync.cluster_ip == "None" and sync.publish_not_ready_addresses is True and sync.ports[0].port == 29500
    assert services["demo-engines"].spec.cluster_ip == "None"

    engine = pods["demo-engine-1"].spec.containers[0]
    assert engine.resources.limits["nvidia.com/gpu"] == "2"
    env = {e.name: e.value for e in engine.env}
    assert env["EXPLORER_SYNC_RANK_OFFSET"] == "3"
    assert pods["demo-engine-1"].spec.node_name.startswith("kwok-gpu-")
    rendered = explorer_config.ExplorerConfig.model_validate(yaml.safe_load(config_map.data["explorer.yaml"]))
    assert [e.rank_offset for e in rendered.rollout.engines] == [1, 3]

    table = subprocess.run(
        ["kubectl", "get", "ej", "-n", jobs.ns],
        env=local_cluster.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert table.split("\n")[0].split()[:5] == ["NAME", "PHASE", "READY", "DESIRED", "STEP"]
    assert table.split("\n")[1].split()[:4] == ["demo", "Running", "2", "2"]


def test_reconciling_an_unchanged_world_sends_no_request(
    jobs: Jobs, local_cluster: kubeplane_cluster.LocalCluster, operator: LocalOperator
) -> None:
    jobs.create(job_manifest("steady"))
    jobs.wait_phase("steady", "Running")
    time.sleep(2)  # let the last status write land
    before_reconciles = operator.metric("explorer_operator_reconciles_total")
    offset = local_cluster.audit_offset()
    # Touch the job (a label: the operator owns nothing there) to force reconcile passes.
    for i in range(3):
        jobs.api.patch_namespaced_custom_object(
            models.GROUP,
            models.VERSION,
            jobs.ns,
            models.PLURAL,
            "steady",
            {"metadata": {"labels": {"touched": str(i)}}},
        )
        time.sleep(1)
    wait_for(
        lambda: operator.metric("explorer_operator_reconciles_total") >= before_reconciles + 3, what="reconcile passes"
    )
    sent = [
        e
        for e in local_cluster.audit_events(offset)
        if e["userAgent"].startswith(("explorer-operator", "kopf"))
        and jobs.ns in e["requestURI"]
        and e["verb"] not in ("watch",)  # kopf's watches are long-lived streams opened before the window
    ]
    # The passes read from kopf's indexes: not even a GET (before the indexes, each pass sent a GET and 4 LISTs).
    assert sent == [], [(e["verb"], e["requestURI"]) for e in sent]


def test_kubectl_scale_changes_the_number_of_engines(jobs: Jobs, local_cluster: Any) -> None:
    jobs.create(job_manifest("scaled"))
    jobs.wait_phase("scaled", "Running")
    env = local_cluster.env()
    subprocess.run(
        ["kubectl", "scale", "ej", "scaled", "-n", jobs.ns, "--replicas=3"],
        env=env,
        check=True,
        capture_output=True,
        timeout=30,
    )
    before = {n: p.metadata.uid for n, p in jobs.pods("scaled").items()}
    wait_for(lambda: jobs.running_pods("scaled") >= {"scaled-engine-2"}, what="third engine")
    after = {n: p.metadata.uid for n, p in jobs.pods("scaled").items()}
    assert all(after[n] == uid for n, uid in before.items()), "scaling must not replace running pods"
    wait_for(lambda: jobs.get("scaled")["status"]["engines"]["ready"] == 3, what="3 engines ready")
    subprocess.run(
        ["kubectl", "scale", "ej", "scaled", "-n", jobs.ns, "--replicas=1"],
        env=env,
        check=True,
        capture_output=True,
        timeout=30,
    )
    wait_for(lambda: jobs.running_pods("scaled") == {"scaled-coordinator", "scaled-engine-0"}, what="scale down")
    scale = json.loads(
        subprocess.run(
            ["kubectl", "get", "--raw", f"/apis/{models.API_VERSION}/namespaces/{jobs.ns}/explorerjobs/scaled/scale"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    )
    assert scale["spec"]["replicas"] == 1
    wait_for(lambda: jobs.get("scaled")["status"]["engines"]["current"] == 1, what="status current 1")


def test_suspend_removes_pods_and_resume_brings_them_back(jobs: Jobs) -> None:
    jobs.create(job_manifest("napper"))
    jobs.wait_phase("napper", "Running")
    jobs.patch_spec("napper", {"suspend": True})
    jobs.wait_phase("napper", "Suspended")
    wait_for(lambda: not jobs.pods("napper"), what="pods removed")
    suspended = jobs.condition("napper", "Suspended")
    assert suspended is not None and suspended["status"] == "True"
    assert jobs.core.read_namespaced_service("napper-sync", jobs.ns)  # the rendezvous address stays
    jobs.patch_spec("napper", {"suspend": False})
    jobs.wait_phase("napper", "Running")
    assert jobs.running_pods("napper") == {"napper-coordinator", "napper-engine-0", "napper-engine-1"}


def test_deleted_children_are_recreated(jobs: Jobs) -> None:
    jobs.create(job_manifest("phoenix"))
    jobs.wait_phase("phoenix", "Running")
    old_uid = jobs.pods("phoenix")["phoenix-engine-0"].metadata.uid
    jobs.core.delete_namespaced_service("phoenix-sync", jobs.ns)
    jobs.core.delete_namespaced_pod("phoenix-engine-0", jobs.ns)
    wait_for(
        lambda: jobs.core.list_namespaced_service(jobs.ns, field_selector="metadata.name=phoenix-sync").items,
        what="sync service recreated",
    )
    wait_for(
        lambda: (
            (p := jobs.pods("phoenix").get("phoenix-engine-0")) is not None
            and p.metadata.uid != old_uid
            and p.status.phase == "Running"
        ),
        what="engine-0 recreated",
    )


def test_failed_engines_restart_with_backoff_until_the_budget_is_spent(jobs: Jobs) -> None:
    jobs.create(job_manifest("fragile", restartPolicy={"maxRestarts": 2, "backoffSeconds": 1, "maxBackoffSeconds": 8}))
    jobs.wait_phase("fragile", "Running")
    for attempt in range(3):
        pod = wait_for(
            lambda: (p := jobs.pods("fragile").get("fragile-engine-1")) and p.status.phase == "Running" and p,
            timeout=60,
            what=f"engine-1 running (attempt {attempt})",
        )
        jobs.core.patch_namespaced_pod("fragile-engine-1", jobs.ns, {"metadata": {"labels": {FAIL_LABEL: "true"}}})
        failed_uid = pod.metadata.uid
        if attempt < 2:
            wait_for(
                lambda uid=failed_uid: (
                    (p := jobs.pods("fragile").get("fragile-engine-1")) is not None and p.metadata.uid != uid
                ),
                timeout=60,
                what="replacement pod",
            )
            status = jobs.get("fragile")["status"]
            assert status["restarts"] == attempt + 1
    job = jobs.wait_phase("fragile", "Failed", timeout=60)
    failed = jobs.condition("fragile", "Failed")
    assert failed is not None and failed["reason"] == "RestartBudgetExceeded"
    assert "fragile-engine-1" in failed["message"] and "containerFailed" in failed["message"]
    assert job["status"]["restarts"] == 2
    wait_for(lambda: not jobs.pods("fragile"), what="pods of the failed job removed")
    reasons = [e["reason"] for e in jobs.events("fragile")]
    assert reasons.count("PodFailed") == 2 and "RestartBudgetExceeded" in reasons


def test_deleting_the_job_garbage_collects_everything(jobs: Jobs) -> None:
    jobs.create(job_manifest("ephemeral"))
    jobs.wait_phase("ephemeral", "Running")
    jobs.api.delete_namespaced_custom_object(models.GROUP, models.VERSION, jobs.ns, models.PLURAL, "ephemeral")
    selector = f"{builders.JOB_LABEL}=ephemeral"
    wait_for(
        lambda: (
            not jobs.core.list_namespaced_pod(jobs.ns, label_selector=selector).items
            and not jobs.core.list_namespaced_service(jobs.ns, label_selector=selector).items
            and not jobs.core.list_namespaced_config_map(jobs.ns, label_selector=selector).items
        ),
        timeout=60,
        what="children garbage-collected",
    )


def test_api_server_rejects_invalid_manifests_with_the_rule(
    local_cluster: Any, namespace: str, crd_installed: None
) -> None:
    cases = {
        "sync.checkpointPath is required when sync.method is checkpoint": {"sync": {"method": "checkpoint"}},
        "workflow.importPath is required when name is custom": {"workflow": {"name": "custom"}},
        "spec.engines.replicas": {"engines": {"replicas": -1}},
        'spec.sync.method: Unsupported value: "rdma"': {"sync": {"method": "rdma"}},
    }
    for expected, spec in cases.items():
        manifest = yaml.safe_dump(job_manifest("bad", **spec))
        out = subprocess.run(
            ["kubectl", "apply", "-n", namespace, "-f", "-"],
            input=manifest,
            text=True,
            check=False,
            env=local_cluster.env(),
            capture_output=True,
            timeout=30,
        )
        assert out.returncode != 0
        assert expected in out.stderr, out.stderr


def test_spec_that_cannot_work_fails_with_invalid_spec_and_an_event(jobs: Jobs) -> None:
    jobs.create(job_manifest("relative", taskset={"path": "data/train.jsonl"}))
    jobs.wait_phase("relative", "Failed")
    failed = jobs.condition("relative", "Failed")
    assert failed is not None and failed["reason"] == "InvalidSpec"
    assert "spec.taskset.path must be an absolute path" in failed["message"]
    assert not jobs.pods("relative")
    wait_for(
        lambda: [e for e in jobs.events("relative") if e["reason"] == "InvalidSpec" and e["type"] == "Warning"],
        what="InvalidSpec event",
    )
    jobs.patch_spec("relative", {"taskset": {"path": "/data/train.jsonl"}})
    jobs.wait_phase("relative", "Running")  # fixed spec: the job starts over


def test_unschedulable_engines_show_as_degraded_then_hit_the_startup_deadline(jobs: Jobs) -> None:
    jobs.create(
        job_manifest("greedy", model={"path": "/models/big", "tensorParallelSize": 16}, startupDeadlineSeconds=10)
    )
    # The scheduler marks the engines one by one, so a pass may quote either of them: any engine will do.
    degraded = wait_for(lambda: (c := jobs.condition("greedy", "Degraded")) and c["status"] == "True" and c,
                        what="Degraded")  # fmt: skip
    assert degraded["reason"] == "Unschedulable"
    assert "greedy-engine-" in degraded["message"] and "nvidia.com/gpu" in degraded["message"]
    assert jobs.get("greedy")["status"]["phase"] == "Initializing"
    jobs.wait_phase("greedy", "Failed", timeout=40)
    failed = jobs.condition("greedy", "Failed")
    assert failed is not None and failed["reason"] == "StartupDeadlineExceeded"
    # It names the engines that never became ready (which of them the last pass saw refused, and so whether the
    # scheduler's reason is quoted, varies: the scheduler retries them one by one).
    assert "greedy-engine-" in failed["message"], failed["message"]


@pytest.fixture
def coordinator_report() -> Iterator[tuple[status_api.StatusServer, list[str]]]:
    """A real status server; the test binds it to the coordinator pod's loopback IP once that exists."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    holder: list[status_api.StatusServer] = []
    port = free_port()

    def start(ip: str, job_token: str) -> status_api.StatusServer:
        server = status_api.StatusServer(ip, port, accepted=lambda: [job_token])
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        holder.append(server)
        return server

    yield start, [str(port)]  # type: ignore[misc]
    for server in holder:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_status_mirrors_the_coordinator_report_and_ready_waits_for_sync(jobs: Jobs, coordinator_report: Any) -> None:
    start, (port,) = coordinator_report
    jobs.create(
        job_manifest(
            "mirror", coordinator={"apiPort": int(port)}, onCompletion="DeleteEngines", explore={"totalSteps": 10}
        )
    )
    jobs.wait_phase("mirror", "Running")
    pod_ip = jobs.pods("mirror")["mirror-coordinator"].status.pod_ip
    secret = jobs.core.read_namespaced_secret("mirror-credentials", jobs.ns)
    job_token = base64.b64decode(secret.data["job-token"]).decode()
    # A real explorer status API on the coordinator pod's (loopback) IP, admitting only the job's own token: the
    # operator must present the one from the job's Secret.
    server = start(pod_ip, job_token)
    server.report = status_api.CoordinatorReport(
        phase="Running",
        step=3,
        total_steps=10,
        policy_version=2,
        engines_in_sync=1,
        last_sync_time="2026-11-29T08:00:00Z",
        last_sync_duration_seconds=0.5,
        last_sync_bytes=1234,
    )
    wait_for(lambda: (c := jobs.condition("mirror", "Synced")) and c["reason"] == "EnginesBehind", what="behind")
    ready = jobs.condition("mirror", "Ready")
    assert ready is not None and ready["status"] == "False" and ready["reason"] == "EnginesNotInSync"
    status = jobs.get("mirror")["status"]
    assert (status["step"], status["policyVersion"], status["engines"]["inSync"]) == (3, 2, 1)
    assert status["lastSync"] == {"time": "2026-11-29T08:00:00Z", "durationSeconds": 0.5, "bytes": 1234}

    server.report = server.report.model_copy(update={"engines_in_sync": 2, "step": 4})
    wait_for(lambda: (c := jobs.condition("mirror", "Ready")) and c["status"] == "True", what="Ready once in sync")
    synced = jobs.condition("mirror", "Synced")
    assert synced is not None and synced["status"] == "True"

    server.report = server.report.model_copy(update={"phase": "Succeeded", "step": 10})
    job = jobs.wait_phase("mirror", "Succeeded")
    assert job["status"]["completionTime"]
    wait_for(lambda: jobs.running_pods("mirror") == {"mirror-coordinator"}, what="engines removed on success")


def test_changed_engine_template_replaces_engines_one_at_a_time(jobs: Jobs) -> None:
    jobs.create(job_manifest("rolling", engines={"replicas": 3}))
    jobs.wait_phase("rolling", "Running")
    jobs.patch_spec("rolling", {"engines": {"image": "registry.invalid/runtime:2"}})
    worst = 0

    def rolled() -> bool:
        nonlocal worst
        pods = jobs.pods("rolling")
        engines = [pods.get(f"rolling-engine-{i}") for i in range(3)]
        worst = max(worst, sum(1 for p in engines if p is None or p.status.phase != "Running"))
        return all(
            p is not None and p.status.phase == "Running" and p.spec.containers[0].image == "registry.invalid/runtime:2"
            for p in engines
        )

    wait_for(rolled, timeout=90, what="every engine on the new image")
    assert worst <= 1, f"{worst} engines were down at once"
    assert jobs.pods("rolling")["rolling-coordinator"].spec.containers[0].image == "registry.invalid/runtime:2"
    jobs.wait_phase("rolling", "Running")
