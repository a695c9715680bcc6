"""Refused writes and ownership by UID, as pure planning and as the executor's handling of API answers (no cluster)."""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
from typing import Any

import httpx
import pytest
from kubernetes.client.exceptions import ApiException

from explorer_operator import builders, conditions, kube, models, planner, reconcile, world
from explorer_operator.world import CONFLICT, REJECTED, ChildFailure, Observed

JOB = builders.JobRef(name="rl", namespace="team", uid="uid-new")
OLD = builders.JobRef(name="rl", namespace="team", uid="uid-old")
NOW = datetime.datetime(2026, 11, 29, 8, 0, 0, tzinfo=datetime.UTC)
QUOTA = 'pods "rl-engine-0" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=2'


def spec(**overrides: Any) -> models.ExplorerJobSpec:
    body: dict[str, Any] = {
        "model": {"path": "/models/m", "tensorParallelSize": 2},
        "engines": {"replicas": 2},
        "taskset": {"path": "/data/t.jsonl"},
        "startupDeadlineSeconds": 60,
    }
    body.update(overrides)
    return models.ExplorerJobSpec.model_validate(body)


def running(pod: dict[str, Any], phase: str = "Running") -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    pod["metadata"]["uid"] = f"pod-{pod['metadata']['name']}"
    pod["status"] = {"phase": phase, "conditions": [{"type": "Ready", "status": "True"}]}
    return pod


def listed(job: builders.JobRef, s: models.ExplorerJobSpec) -> dict[str, dict[str, dict[str, Any]]]:
    """Everything a label-selected list returns for a settled job built for ``job``."""
    out: dict[str, dict[str, dict[str, Any]]] = {kind: {} for kind in kube.CORE_KINDS}
    for name, pod in builders.build_desired_pods(job, s).items():
        out["Pod"][name] = running(pod)
    for child in builders.build_static_children(job, s):
        out[child["kind"]][child["metadata"]["name"]] = child
    out["Secret"][builders.credentials_name(job)] = builders.build_credentials(
        job, {"job-token": "j", "trainer-token": "t"}
    )
    return out


def plan(s: models.ExplorerJobSpec, observed: Observed, previous: models.ExplorerJobStatus | None = None,
         failures: tuple[ChildFailure, ...] = (), now: datetime.datetime = NOW) -> world.Plan:  # fmt: skip
    return planner.plan(JOB, 1, s, previous or models.ExplorerJobStatus(), observed, now, failures)


def condition(result: world.Plan, type_: str) -> dict[str, Any]:
    return next(c for c in result.status["conditions"] if c["type"] == type_)


def test_a_labelled_object_is_a_child_only_when_its_controller_reference_has_the_jobs_uid() -> None:
    lists = listed(JOB, spec())
    stray = running(builders.build_engine_pod(JOB, spec(), builders.engine_groups(spec())[0], 7))
    stray["metadata"]["ownerReferences"] = []
    lists["Pod"]["rl-engine-7"] = stray
    lists["ConfigMap"]["rl-config"]["metadata"]["ownerReferences"][0]["controller"] = False
    observed = world.observe(JOB.uid, lists)
    assert sorted(observed.pods) == ["rl-coordinator", "rl-engine-0", "rl-engine-1"]
    assert sorted(observed.foreign) == [("ConfigMap", "rl-config"), ("Pod", "rl-engine-7")]
    assert "rl-config" not in observed.config_maps


def test_a_stray_labelled_pod_is_neither_deleted_nor_counted() -> None:
    s = spec()
    lists = listed(JOB, s)
    stray = running(builders.build_engine_pod(OLD, s, builders.engine_groups(s)[0], 5))
    lists["Pod"]["rl-engine-5"] = stray
    result = plan(s, world.observe(JOB.uid, lists))
    assert result.deletes == [] and result.failures == []
    assert result.status["engines"]["current"] == 2 and result.status["phase"] == "Running"


def test_a_recreated_job_inherits_nothing_from_its_predecessors_children() -> None:
    s = spec()
    lists = listed(OLD, s)
    lists["Pod"]["rl-coordinator"] = running(lists["Pod"]["rl-coordinator"], phase="Succeeded")
    result = plan(s, world.observe(JOB.uid, lists))
    status = result.status
    assert status["phase"] == "Pending" and status["engines"]["current"] == 0 and status["engines"]["ready"] == 0
    assert condition(result, "Ready")["status"] == "False"
    assert result.applies == [] and result.deletes == []  # nothing overwritten, nothing of theirs deleted
    conflicts = {(f.kind, f.name) for f in result.failures}
    assert ("Pod", "rl-coordinator") in conflicts and ("ConfigMap", "rl-config") in conflicts
    degraded = condition(result, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", CONFLICT)
    assert "Pod rl-coordinator not written: exists and is not owned by this job" in degraded["message"]
    assert "uid-old" in degraded["message"]
    assert {e.reason for e in result.events} == {CONFLICT}


def test_a_refused_pod_shows_under_degraded_with_one_event_and_a_backed_off_retry() -> None:
    s = spec()
    lists = listed(JOB, s)
    del lists["Pod"]["rl-engine-0"]
    lists["Pod"]["rl-coordinator"]["status"] = {"phase": "Pending"}  # no status polling: the retry sets the pace
    observed = world.observe(JOB.uid, lists)
    first = plan(s, observed)
    assert [o["metadata"]["name"] for o in first.applies] == ["rl-engine-0"]
    refused = (ChildFailure("Pod", "rl-engine-0", REJECTED, QUOTA),)
    result = plan(s, observed, failures=refused)
    degraded = condition(result, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", REJECTED)
    assert degraded["message"].startswith(f"Pod rl-engine-0 rejected: {QUOTA}")
    assert [(e.type, e.reason) for e in result.events] == [("Warning", REJECTED)]
    assert result.requeue_after == 5.0
    assert f"Pod rl-engine-0 rejected: {QUOTA}" in condition(result, "Ready")["message"]

    previous = models.ExplorerJobStatus.model_validate(result.status)
    later = NOW + datetime.timedelta(seconds=20)
    again = plan(s, observed, previous, refused, now=later)
    assert again.events == []  # the same refusal is not reported twice
    assert again.status == result.status  # and costs no status write
    assert again.requeue_after == 20.0  # retried after as long as it has lasted
    recovered = plan(s, world.observe(JOB.uid, listed(JOB, s)), previous, now=later)
    assert condition(recovered, "Degraded")["status"] == "False" and recovered.status["phase"] == "Running"


def test_a_refused_static_child_does_not_stop_the_pods_and_is_reported() -> None:
    s = spec()
    empty = world.observe(JOB.uid, {kind: {} for kind in kube.CORE_KINDS})
    refused = (ChildFailure("NetworkPolicy", "rl-isolation", REJECTED, "denied by webhook"),)
    result = plan(s, empty, failures=refused)
    assert sum(o["kind"] == "Pod" for o in result.applies) == 3  # the rest of the plan still happens
    assert "NetworkPolicy rl-isolation rejected: denied by webhook" in condition(result, "Degraded")["message"]


def test_the_startup_deadline_fails_a_job_whose_pods_are_refused_and_names_the_refusal() -> None:
    s = spec()
    lists = listed(JOB, s)
    del lists["Pod"]["rl-engine-0"], lists["Pod"]["rl-engine-1"]
    started = models.ExplorerJobStatus(start_time="2026-11-29T07:58:00Z")
    refused = tuple(ChildFailure("Pod", f"rl-engine-{i}", REJECTED, QUOTA) for i in range(2))
    result = plan(s, world.observe(JOB.uid, lists), started, refused)
    assert result.status["phase"] == "Failed"
    failed = condition(result, "Failed")
    assert failed["reason"] == "StartupDeadlineExceeded"
    assert f"Pod rl-engine-1 rejected: {QUOTA}" in failed["message"]
    assert {e.reason for e in result.events} == {REJECTED, "StartupDeadlineExceeded"}


def api_error(status: int, message: str = "") -> ApiException:
    body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": status})
    return ApiException(status=status, reason="Refused", body=body)


@pytest.mark.parametrize(("status", "transient"), [(403, False), (422, False), (400, False), (404, False),
                                                   (409, True), (429, True), (500, True), (503, True)])  # fmt: skip
def test_only_timeouts_conflicts_throttling_and_server_errors_are_transient(status: int, transient: bool) -> None:
    assert kube.is_transient(api_error(status)) is transient


def test_the_api_servers_message_is_quoted_short() -> None:
    assert kube.error_message(api_error(403, QUOTA)) == QUOTA
    assert kube.error_message(ApiException(status=502, reason="Bad Gateway")) == "502 Bad Gateway"
    assert len(kube.error_message(api_error(422, "x" * 5000))) == kube.MESSAGE_LIMIT


class FakeKube:
    """The executor's view of the API server: the job, the children by (kind, name), and scripted refusals."""

    def __init__(self, job: dict[str, Any], objects: dict[tuple[str, str], dict[str, Any]],
                 refuse: dict[str, ApiException]):  # fmt: skip
        self.job_object, self.objects, self.refuse = job, objects, refuse
        self.applied: list[str] = []
        self.deleted: list[tuple[str, str, str]] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    # the indexes' View: what the watches would have delivered
    def job(self, namespace: str, name: str) -> dict[str, Any]:
        return self.job_object

    def children(self, namespace: str, name: str) -> dict[str, dict[str, dict[str, Any]]]:
        label = f"{builders.JOB_LABEL}={name}"
        return {kind: {n: o for (k, n), o in self.objects.items() if k == kind and label in _label_pairs(o)}
                for kind in kube.CORE_KINDS}  # fmt: skip

    def get_core(self, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, name))

    def apply(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        if name in self.refuse:
            raise self.refuse[name]
        self.applied.append(name)
        self.objects[(obj["kind"], name)] = obj

    def create(self, obj: dict[str, Any]) -> bool:
        if (obj["kind"], obj["metadata"]["name"]) in self.objects:
            return False
        self.apply(obj)
        return True

    def delete(self, namespace: str, kind: str, name: str, uid: str) -> None:
        self.deleted.append((kind, name, uid))

    def apply_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.statuses.append(status)
        self.job_object["status"] = status

    def post_event(self, job: dict[str, Any], type_: str, reason: str, note: str, event_time: str) -> None:
        self.events.append((type_, reason, note))


def _label_pairs(obj: dict[str, Any]) -> set[str]:
    return {f"{k}={v}" for k, v in (obj["metadata"].get("labels") or {}).items()}


def fake_cluster(refuse: dict[str, ApiException], **extra: dict[str, Any]) -> FakeKube:
    job = {"metadata": {"name": "rl", "namespace": "team", "uid": JOB.uid, "generation": 1},
           "spec": spec().to_wire()}  # fmt: skip
    objects = {(o["kind"], n): o for n, o in extra.items()}
    return FakeKube(job, objects, refuse)


def reconcile_once(api: FakeKube) -> float | None:
    async def run() -> float | None:
        async with httpx.AsyncClient() as http:
            return await reconcile.Reconciler(api, http, api).reconcile("team", "rl")  # type: ignore[arg-type]

    return asyncio.run(run())


def test_a_refused_write_still_leaves_status_events_and_every_other_child() -> None:
    api = fake_cluster({"rl-engine-1": api_error(403, QUOTA)})
    requeue = reconcile_once(api)
    assert "rl-engine-1" not in api.applied
    assert {"rl-config", "rl-sync", "rl-isolation", "rl-coordinator", "rl-engine-0"} <= set(api.applied)
    degraded = next(c for c in api.statuses[-1]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == REJECTED and f"Pod rl-engine-1 rejected: {QUOTA}" in degraded["message"]
    assert ("Warning", REJECTED, f"Pod rl-engine-1 rejected: {QUOTA}") in api.events
    assert requeue is not None and requeue <= conditions.CHILD_RETRY_MAX_SECONDS
    reconcile_once(api)
    assert [e for e in api.events if e[1] == REJECTED] == [("Warning", REJECTED, f"Pod rl-engine-1 rejected: {QUOTA}")]


def test_a_transient_error_is_retried_with_backoff_after_status_is_written() -> None:
    api = fake_cluster({"rl-engine-1": api_error(503, "etcd leader changed")})
    with pytest.raises(reconcile.TransientWriteError, match="rl-engine-1"):
        reconcile_once(api)
    assert api.statuses and not [e for e in api.events if e[1] == REJECTED]


def test_an_unowned_object_holding_a_childs_name_is_reported_not_overwritten() -> None:
    theirs = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"keep": "me"},
              "metadata": {"name": "rl-config", "namespace": "team"}}  # fmt: skip
    api = fake_cluster({}, **{"rl-config": theirs})
    reconcile_once(api)
    assert "rl-config" not in api.applied and api.objects[("ConfigMap", "rl-config")] is theirs
    degraded = next(c for c in api.statuses[-1]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == CONFLICT and "ConfigMap rl-config not written" in degraded["message"]
    assert "no controller" in degraded["message"]
    assert [e[1] for e in api.events] == [CONFLICT]


def test_the_jobs_tokens_are_never_replaced_and_a_foreign_secret_is_never_adopted() -> None:
    ours = builders.build_credentials(JOB, {"job-token": "kept", "trainer-token": "kept-too"})
    ours["metadata"]["labels"] = {}  # the index has not seen it yet: only a GET shows it
    api = fake_cluster({}, **{"rl-credentials": ours})
    reconcile_once(api)
    assert "rl-credentials" not in api.applied
    assert builders.secret_token(api.objects[("Secret", "rl-credentials")], "job-token") == "kept"

    theirs = {"apiVersion": "v1", "kind": "Secret", "data": {"password": "aHVudGVyMg=="},
              "metadata": {"name": "rl-credentials", "namespace": "team"}}  # fmt: skip
    api = fake_cluster({}, **{"rl-credentials": theirs})
    reconcile_once(api)
    assert api.objects[("Secret", "rl-credentials")] is theirs
    degraded = next(c for c in api.statuses[-1]["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == CONFLICT and "Secret rl-credentials not written" in degraded["message"]


def test_deletes_name_the_uid_they_mean() -> None:
    s = spec(engines={"replicas": 1})
    extra = running(builders.build_engine_pod(JOB, s, builders.engine_groups(s)[0], 1))
    api = fake_cluster({}, **{"rl-engine-1": extra})
    api.job_object["spec"] = s.to_wire()
    reconcile_once(api)
    assert api.deleted == [("Pod", "rl-engine-1", "pod-rl-engine-1")]


class StaleIndex(FakeKube):
    """The watch lags: the index keeps showing the job as it was before the operator's status writes, and the
    failed pod the operator already deleted."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.indexed = copy.deepcopy(self.job_object)
        self.indexed["metadata"]["resourceVersion"] = "1"
        self.writes = 0

    def job(self, namespace: str, name: str) -> dict[str, Any]:
        return self.indexed

    def delete(self, namespace: str, kind: str, name: str, uid: str) -> None:
        self.deleted.append((kind, name, uid))  # the index still lists it

    def apply_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.writes += 1
        self.statuses.append(status)
        answer = copy.deepcopy(self.indexed)
        answer["metadata"]["resourceVersion"] = str(1 + self.writes)
        answer["status"] = status
        return answer


def test_a_lagging_index_never_handles_a_pod_failure_twice_and_our_own_write_is_recognised() -> None:
    s = spec(engines={"replicas": 1})
    failed = running(builders.build_engine_pod(JOB, s, builders.engine_groups(s)[0], 0), phase="Failed")
    api = StaleIndex(fake_cluster({}).job_object, {("Pod", "rl-engine-0"): failed}, {})
    api.indexed["spec"] = s.to_wire()

    async def passes() -> reconcile.Reconciler:
        async with httpx.AsyncClient() as http:
            reconciler = reconcile.Reconciler(api, http, api)  # type: ignore[arg-type]
            await reconciler.reconcile("team", "rl")
            await reconciler.reconcile("team", "rl")  # before the watch delivers the first pass's write
            return reconciler

    reconciler = asyncio.run(passes())
    assert api.statuses[0]["restarts"] == 1
    assert [e[1] for e in api.events].count("PodFailed") == 1
    assert api.writes == 1, "the second pass planned from the status it wrote, so it had nothing to write"
    assert reconciler.wrote("team", "rl", "2") and not reconciler.wrote("team", "rl", "1")
