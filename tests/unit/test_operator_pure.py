"""Builders, planner and validation of the operator as pure functions (no cluster)."""

from __future__ import annotations

import copy
import dataclasses
import datetime
from typing import Any

from explorer import credentials, status_api
from explorer_operator import builders, models, planner, validation
from explorer_operator.world import Observed

JOB = builders.JobRef(name="rl", namespace="team", uid="uid-1")
NOW = datetime.datetime(2026, 11, 29, 8, 0, 0, tzinfo=datetime.UTC)


def spec(**overrides: Any) -> models.ExplorerJobSpec:
    body: dict[str, Any] = {
        "model": {"path": "/models/m", "tensorParallelSize": 2},
        "engines": {"replicas": 3},
        "taskset": {"path": "/data/t.jsonl"},
        "restartPolicy": {"maxRestarts": 2, "backoffSeconds": 10, "maxBackoffSeconds": 15},
    }
    body.update(overrides)
    return models.ExplorerJobSpec.model_validate(body)


def running(pod: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["metadata"]["uid"] = f"uid-{pod['metadata']['name']}"
    pod["status"] = {"phase": "Running", "podIP": "127.64.0.9", "conditions": [{"type": "Ready", "status": "True"}]}
    return pod


def world(s: models.ExplorerJobSpec, **pod_overrides: dict[str, Any]) -> Observed:
    pods = {n: running(p) for n, p in builders.build_desired_pods(JOB, s).items()}
    pods.update(pod_overrides)
    children = builders.build_static_children(JOB, s)
    return Observed(
        pods=pods,
        services={c["metadata"]["name"]: c for c in children if c["kind"] == "Service"},
        config_maps={c["metadata"]["name"]: c for c in children if c["kind"] == "ConfigMap"},
        network_policies={c["metadata"]["name"]: c for c in children if c["kind"] == "NetworkPolicy"},
        secrets={f"{JOB.name}-credentials": builders.build_credentials(JOB, {"job-token": "j", "trainer-token": "t"})},
    )


def test_engine_pods_request_tp_gpus_and_get_collision_free_sync_ranks() -> None:
    s = spec()
    pods = [builders.build_engine_pod(JOB, s, builders.engine_groups(s)[0], i) for i in range(3)]
    offsets = []
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert "--tensor-parallel-size" in container["args"]
        env = {e["name"]: e["value"] for e in container["env"]}
        offsets.append(int(env["EXPLORER_SYNC_RANK_OFFSET"]))
        assert env["EXPLORER_SYNC_ADDRESS"] == "rl-sync.team.svc:29500"
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["spec"]["subdomain"] == "rl-engines"
        assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 1800
        assert pod["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert offsets == [1, 3, 5]  # trainer is rank 0; each engine owns tp ranks


def test_same_spec_gives_identical_manifests_and_hashes() -> None:
    assert builders.build_desired_pods(JOB, spec()) == builders.build_desired_pods(JOB, spec())
    changed = builders.build_desired_pods(JOB, spec(engines={"replicas": 3, "image": "other:2"}))
    assert builders.template_hash(changed["rl-engine-0"]) != builders.template_hash(
        builders.build_desired_pods(JOB, spec())["rl-engine-0"]
    )


def test_scaling_changes_no_existing_pod_template() -> None:
    small, big = (
        builders.build_desired_pods(JOB, spec()),
        builders.build_desired_pods(JOB, spec(engines={"replicas": 5})),
    )
    assert all(big[name] == pod for name, pod in small.items())


def test_fresh_job_plan_creates_everything_and_an_unchanged_world_plans_nothing() -> None:
    s = spec()
    empty = Observed(pods={}, services={}, config_maps={})
    first = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), empty, NOW)
    kinds = sorted(o["kind"] for o in first.applies)
    assert kinds == ["ConfigMap"] + ["NetworkPolicy"] * 3 + ["Pod"] * 4 + ["Secret"] + ["Service"] * 3
    status = models.ExplorerJobStatus.model_validate(first.status)
    settled = planner.plan(JOB, 1, s, status, world(s), NOW)
    assert settled.applies == [] and settled.deletes == []
    again = planner.plan(JOB, 1, s, models.ExplorerJobStatus.model_validate(settled.status), world(s), NOW)
    assert again.status == settled.status  # status is a function of the world: no write the second time
    assert again.status["phase"] == "Running"


def test_a_pod_being_deleted_no_longer_counts_as_ready() -> None:
    s = spec()
    settled = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), world(s), NOW)
    name = next(n for n in builders.build_desired_pods(JOB, s) if "engine" in n)
    leaving = running(builders.build_desired_pods(JOB, s)[name])
    leaving["metadata"]["deletionTimestamp"] = "2026-11-29T08:00:00Z"  # its status still says Ready
    status = models.ExplorerJobStatus.model_validate(settled.status)
    result = planner.plan(JOB, 1, s, status, world(s, **{name: leaving}), NOW)
    assert result.status["engines"]["ready"] == settled.status["engines"]["ready"] - 1
    ready = next(c for c in result.status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and name in ready["message"]


def test_failed_engine_is_replaced_after_backoff_and_the_budget_ends_the_job() -> None:
    s = spec()
    failed = running(builders.build_desired_pods(JOB, s)["rl-engine-1"])
    failed["status"] = {
        "phase": "Failed",
        "containerStatuses": [{"state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}],
    }
    result = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), world(s, **{"rl-engine-1": failed}), NOW)
    assert ("Pod", "rl-engine-1", "uid-rl-engine-1") in result.deletes  # the UID goes out as a precondition
    status = models.ExplorerJobStatus.model_validate(result.status)
    assert status.restarts == 1 and status.pending_restarts[0].not_before == "2026-11-29T08:00:10Z"
    assert result.requeue_after is not None and result.requeue_after <= 10
    assert any(e.reason == "PodFailed" and "OOMKilled (exit 137)" in e.message for e in result.events)

    gone = world(s)
    del gone.pods["rl-engine-1"]
    waiting = planner.plan(JOB, 1, s, status, gone, NOW + datetime.timedelta(seconds=5))
    assert not [o for o in waiting.applies if o["kind"] == "Pod"]  # still backing off
    later = planner.plan(JOB, 1, s, status, gone, NOW + datetime.timedelta(seconds=11))
    assert [o["metadata"]["name"] for o in later.applies if o["kind"] == "Pod"] == ["rl-engine-1"]

    spent = status.model_copy(update={"restarts": 2, "pending_restarts": []})
    final = planner.plan(JOB, 1, s, spent, world(s, **{"rl-engine-1": failed}), NOW)
    assert final.status["phase"] == "Failed"
    reason = next(c for c in final.status["conditions"] if c["type"] == "Failed")
    assert reason["reason"] == "RestartBudgetExceeded" and "rl-engine-1" in reason["message"]


def test_backoff_doubles_up_to_its_ceiling() -> None:
    policy = models.RestartPolicySpec(backoff_seconds=10, max_backoff_seconds=35)
    assert [planner.backoff_seconds(policy, n) for n in range(4)] == [10, 20, 35, 35]


def test_unschedulable_pod_shows_under_degraded_with_its_own_reason() -> None:
    s = spec()
    stuck = copy.deepcopy(builders.build_desired_pods(JOB, s)["rl-engine-2"])
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/4 nodes: Insufficient nvidia.com/gpu"}  # fmt: skip
    stuck["status"] = {"phase": "Pending", "conditions": [unschedulable]}
    result = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), world(s, **{"rl-engine-2": stuck}), NOW)
    conds = {c["type"]: c for c in result.status["conditions"]}
    assert conds["Degraded"]["reason"] == "Unschedulable" and "rl-engine-2" in conds["Degraded"]["message"]
    assert conds["Ready"]["status"] == "False" and result.status["phase"] == "Initializing"


def test_specs_that_cannot_work_are_explained() -> None:
    problems = validation.spec_problems(spec(taskset={"path": "s3://bucket/t.jsonl"},
                                             workflow={"name": "custom", "importPath": "not a path"}))  # fmt: skip
    assert any("spec.taskset.path must be a path inside the pod" in p for p in problems)
    assert any("spec.workflow.importPath must look like" in p for p in problems)
    assert validation.spec_problems(spec()) == []
    assert validation.spec_problems(spec(taskset={"path": "builtin:arithmetic"})) == []  # made by the runtime
    assert validation.spec_problems(spec(taskset={"path": "builtin:nope"}))  # not a taskset the runtime knows


def test_cpu_workers_and_auxiliary_groups_get_their_own_pods_and_services() -> None:
    s = spec(coordinator={"cpuWorkers": 2},
             auxiliaryModels=[{"name": "judge", "replicas": 1, "model": {"path": "/models/judge"}}])  # fmt: skip
    pods = builders.build_desired_pods(JOB, s)
    assert {"rl-worker-0", "rl-worker-1", "rl-judge-0"} <= set(pods)
    worker = pods["rl-worker-0"]["spec"]["containers"][0]
    assert worker["command"][:2] == ["ray", "start"] and "rl-coordinator.team.svc:6379" in worker["command"][-1]
    assert "nvidia.com/gpu" not in str(worker["resources"])
    judge = pods["rl-judge-0"]
    assert judge["spec"]["subdomain"] == "rl-judge"
    assert {e["name"]: e["value"] for e in judge["spec"]["containers"][0]["env"]}["EXPLORER_SYNC_RANK_OFFSET"] == "0"
    services = {svc["metadata"]["name"] for svc in builders.build_services(JOB, s)}
    assert services == {"rl-sync", "rl-coordinator", "rl-engines", "rl-judge"}
    config = builders.build_explorer_config(JOB, s)
    assert config.auxiliary[0].engines[0].url == "http://rl-judge-0.rl-judge.team.svc:8000"


def test_network_policies_admit_own_pods_trainers_on_transfer_ports_and_never_the_engine_api() -> None:
    s = spec()
    policies = {p["metadata"]["name"]: p["spec"] for p in builders.build_network_policies(JOB, s)}
    assert set(policies) == {"rl-isolation", "rl-sync", "rl-engine-transfer"}
    own = {"podSelector": {"matchLabels": {builders.JOB_LABEL: "rl"}}}
    assert policies["rl-isolation"]["ingress"] == [{"from": [own]}]
    sync_rules = policies["rl-sync"]["ingress"]

    def trainers_in(namespace: str) -> dict[str, Any]:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                "podSelector": {"matchLabels": {builders.TRAINER_LABEL: "rl"}}}  # fmt: skip

    # Trainers of the job's own namespace only: a pod labelled trainer-for=rl elsewhere is not admitted; only the
    # sync API itself (groups form over it: no store ports).
    assert sync_rules[0] == {"from": [trainers_in("team")], "ports": [{"protocol": "TCP", "port": s.sync.port}]}
    assert policies["rl-engine-transfer"]["ingress"][0]["from"] == [trainers_in("team")]
    wider = spec(sync={"trainerNamespaces": ["training", "team"]})
    wider_rules = {p["metadata"]["name"]: p["spec"] for p in builders.build_network_policies(JOB, wider)}
    assert wider_rules["rl-sync"]["ingress"][0]["from"] == [trainers_in("training"), trainers_in("team")]
    assert sync_rules[1]["ports"] == [{"protocol": "TCP", "port": s.coordinator.api_port}]
    transfer = policies["rl-engine-transfer"]["ingress"][0]
    covered = [(r["port"], r["endPort"]) for r in transfer["ports"]]
    assert covered == [(1, s.engines.port - 1), (s.engines.port + 1, 65535)]  # everything but the vLLM HTTP port


def test_every_pod_finds_the_job_credentials_and_only_the_coordinator_holds_the_trainer_token() -> None:
    s = spec(coordinator={"cpuWorkers": 1})
    pods = builders.build_desired_pods(JOB, s)
    for name, pod in pods.items():
        container = pod["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env[credentials.DIR_ENV] == credentials.MOUNT_DIR, name
        secret = next(v["secret"] for v in pod["spec"]["volumes"] if v["name"] == builders.CREDENTIALS_VOLUME)
        keys = [i["key"] for i in secret["items"]] if "items" in secret else "all"
        assert keys == ("all" if name == "rl-coordinator" else ["job-token"]), name
    worker_env = {e["name"]: e.get("value") for e in pods["rl-worker-0"]["spec"]["containers"][0]["env"]}
    assert worker_env["RAY_AUTH_MODE"] == "token"
    assert worker_env["RAY_AUTH_TOKEN_PATH"] == f"{credentials.MOUNT_DIR}/job-token"
    engine_args = pods["rl-engine-0"]["spec"]["containers"][0]["args"]
    assert engine_args[engine_args.index("--middleware") + 1] == "explorer.http_auth.EngineAuthMiddleware"


def test_the_credentials_secret_is_made_once_and_rotated_only_on_a_new_request() -> None:
    s = spec()
    minted = {"job-token": "job-1", "trainer-token": "trainer-1"}
    first = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), Observed(pods={}, services={}, config_maps={},
                                                                           minted=minted), NOW)  # fmt: skip
    made = next(o for o in first.applies if o["kind"] == "Secret")
    assert builders.secret_token(made, "job-token") == "job-1" and "resourceVersion" not in made["metadata"]
    assert made["metadata"]["ownerReferences"][0]["uid"] == JOB.uid
    assert first.status["sync"]["credentialsSecret"] == "rl-credentials"
    made["metadata"]["resourceVersion"] = "7"
    settled = dataclasses.replace(world(s), secrets={"rl-credentials": made},
                                  minted={"job-token": "job-2", "trainer-token": "trainer-2"})  # fmt: skip
    assert not [o for o in planner.plan(JOB, 1, s, models.ExplorerJobStatus(), settled, NOW).applies
                if o["kind"] == "Secret"]  # fmt: skip
    rotate = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), dataclasses.replace(settled, rotation="r1"), NOW)
    rotated = next(o for o in rotate.applies if o["kind"] == "Secret")
    assert rotated["metadata"]["resourceVersion"] == "7"  # a stale view is refused by the server, never rotates twice
    tokens = {k: builders.secret_token(rotated, k) for k in ("job-token", "trainer-token", "trainer-token-previous")}
    assert tokens == {"job-token": "job-1", "trainer-token": "trainer-2", "trainer-token-previous": "trainer-1"}
    assert [e.reason for e in rotate.events] == ["TrainerTokenRotated"]
    done = dataclasses.replace(settled, secrets={"rl-credentials": rotated}, rotation="r1")
    assert not [o for o in planner.plan(JOB, 1, s, models.ExplorerJobStatus(), done, NOW).applies
                if o["kind"] == "Secret"]  # fmt: skip


def test_coordinator_and_cpu_workers_mount_the_users_volumes_beside_the_config() -> None:
    """A taskset on a user PVC must be readable by the coordinator and by workflows on the CPU workers (issue #12)."""
    data = {"name": "data", "persistentVolumeClaim": {"claimName": "tasksets", "readOnly": True}}
    mount = {"name": "data", "mountPath": "/data", "readOnly": True}
    s = spec(coordinator={"cpuWorkers": 1, "volumes": [data], "volumeMounts": [mount]})
    pods = builders.build_desired_pods(JOB, s)
    coordinator = pods["rl-coordinator"]["spec"]
    tmp = {"name": builders.TMP_VOLUME, "mountPath": builders.TMP_DIR}
    creds = builders.CREDENTIALS_VOLUME
    creds_mount = {"name": creds, "mountPath": credentials.MOUNT_DIR, "readOnly": True}
    assert [v["name"] for v in coordinator["volumes"]] == ["config", "data", creds, builders.TMP_VOLUME]
    assert [m["mountPath"] for m in coordinator["containers"][0]["volumeMounts"]] == [
        "/etc/explorer",
        "/data",
        credentials.MOUNT_DIR,
        builders.TMP_DIR,
    ]
    worker = pods["rl-worker-0"]["spec"]
    job_token_only = {"secretName": "rl-credentials", "defaultMode": 0o440,
                      "items": [{"key": "job-token", "path": "job-token"}]}  # fmt: skip
    assert worker["volumes"] == [data, {"name": creds, "secret": job_token_only},
                                 {"name": builders.TMP_VOLUME, "emptyDir": {}}]  # fmt: skip
    assert worker["containers"][0]["volumeMounts"] == [mount, creds_mount, tmp]
    # engines keep their own spec.engines.volumes (none here), their /dev/shm, the job token and /tmp
    engine = pods["rl-engine-0"]["spec"]
    assert [v["name"] for v in engine["volumes"]] == [builders.SHM_VOLUME, creds, builders.TMP_VOLUME]
    assert engine["volumes"][1]["secret"] == job_token_only
    assert validation.spec_problems(s) == []

    clash = spec(coordinator={"volumes": [{"name": "config", "emptyDir": {}}],
                              "volumeMounts": [{"name": "config", "mountPath": "/etc/explorer/"}]})  # fmt: skip
    problems = validation.spec_problems(clash)
    assert any(p.startswith("spec.coordinator.volumes must not use the name 'config'") for p in problems)
    assert any(p.startswith("spec.coordinator.volumeMounts must not mount at /etc/explorer") for p in problems)
    shadow = spec(
        engines={
            "volumes": [{"name": "tmp", "emptyDir": {}}],
            "volumeMounts": [{"name": "x", "mountPath": builders.SHM_DIR}],
        }
    )
    problems = validation.spec_problems(shadow)
    assert any(p.startswith("spec.engines.volumes must not use the name 'tmp'") for p in problems), problems
    assert any(p.startswith("spec.engines.volumeMounts must not mount at /dev/shm") for p in problems), problems
    swap = spec(engines={"volumes": [{"name": "credentials", "secret": {"secretName": "mine"}}],
                         "volumeMounts": [{"name": "x", "mountPath": credentials.MOUNT_DIR}]})  # fmt: skip
    problems = validation.spec_problems(swap)  # no job may hand its engines a token of its own choosing
    assert any(p.startswith("spec.engines.volumes must not use the name 'credentials'") for p in problems), problems
    assert any(p.startswith(f"spec.engines.volumeMounts must not mount at {credentials.MOUNT_DIR}") for p in problems)


def test_engines_get_a_memory_backed_dev_shm_and_cpu_engines_request_no_gpu() -> None:
    job = builders.JobRef("j", "ns", "uid")
    tp = spec().model.tensor_parallel_size
    for device, gpus in (("gpu", str(tp)), ("cpu", None)):
        s = spec(engines={"device": device, "volumes": [{"name": "models", "emptyDir": {}}]})
        pod = builders.build_engine_pod(job, s, builders.engine_groups(s)[0], 0)
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes[builders.SHM_VOLUME] == {"name": builders.SHM_VOLUME, "emptyDir": {"medium": "Memory"}}
        assert "models" in volumes
        mounts = {m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert "/dev/shm" in mounts  # noqa: S108
        limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
        assert limits.get(builders.GPU) == gpus


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret"}  # fmt: skip


def test_every_child_pod_asks_for_nothing_pod_security_restricted_refuses() -> None:
    s = spec(coordinator={"cpuWorkers": 1}, auxiliaryModels=[{"name": "judge", "model": {"path": "/m/j"}}])
    for name, pod in builders.build_desired_pods(JOB, s).items():
        pod_spec = pod["spec"]
        context = pod_spec["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod_spec["automountServiceAccountToken"] is False, name
        assert not any(pod_spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        for volume in pod_spec["volumes"]:
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, (name, volume)
        for container in pod_spec["containers"]:
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}, name
            assert not any(p.get("hostPort") for p in container.get("ports", [])), name
            assert {"name": "HOME", "value": builders.TMP_DIR} in container["env"], name
            assert {"name": builders.TMP_VOLUME, "mountPath": builders.TMP_DIR} in container["volumeMounts"], name
            # Engines and workers write only to /tmp and /dev/shm; the coordinator's experience log is still local.
            assert sc["readOnlyRootFilesystem"] is (not name.endswith("-coordinator")), name


def test_an_overdue_trainer_degrades_the_job_and_a_final_trainer_timeout_fails_it_without_a_restart() -> None:
    s = spec()
    settled = planner.plan(JOB, 1, s, models.ExplorerJobStatus(), world(s), NOW)
    status = models.ExplorerJobStatus.model_validate(settled.status)
    waiting = "no push from the trainer for 600s (sync.trainerTimeoutSeconds): step 3 is done and waits for push #3"
    overdue = status_api.CoordinatorReport(phase="Running", step=3, trainer_overdue=True, waiting_for=waiting)
    result = planner.plan(JOB, 1, s, status, dataclasses.replace(world(s), report=overdue), NOW)
    degraded = next(c for c in result.status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"], degraded["message"]) == ("True", "TrainerOverdue", waiting)

    ended = running(builders.build_desired_pods(JOB, s)["rl-coordinator"])
    ended["status"]["phase"] = "Failed"
    final = status_api.CoordinatorReport(phase="Failed", step=3, failure_reason="TrainerTimeout", message=waiting)
    gone = dataclasses.replace(world(s, **{"rl-coordinator": ended}), report=final)
    result = planner.plan(JOB, 1, s, status, gone, NOW)
    failed = next(c for c in result.status["conditions"] if c["type"] == "Failed")
    assert result.status["phase"] == "Failed" and (failed["reason"], failed["message"]) == ("TrainerTimeout", waiting)
    assert result.status.get("restarts", 0) == 0 and not result.status.get("pendingRestarts")
    assert not [o for o in result.applies if o["kind"] == "Pod"]  # no new coordinator to wait again
    assert [e.reason for e in result.events if e.type == "Warning"] == ["TrainerTimeout"]


def test_the_latest_eval_of_each_set_reaches_the_job_status() -> None:
    from explorer import status_api
    from explorer_operator import conditions, models

    report = status_api.CoordinatorReport.model_validate({
        "step": 4, "eval": {"held-out": {"step": 4, "metrics": {"mean@4": 0.5, "pass@4": 0.75}}},
        "aFieldFromANewerCoordinator": {"x": 1},  # ignored: an older operator still reads the report
    })  # fmt: skip
    status = models.ExplorerJobStatus()
    conditions._take_report(status, report, ended=False)
    assert status.to_wire()["eval"] == {"held-out": {"step": 4, "metrics": {"mean@4": 0.5, "pass@4": 0.75}}}
