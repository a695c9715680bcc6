"""The planner's vocabulary: what was observed, and the plan (actions, events, status) it produces."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from explorer import credentials, status_api, termination
from explorer_operator import builders

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def timestamp(now: datetime.datetime) -> str:
    """Kubernetes' second-resolution UTC time string."""
    return now.strftime(TIME_FORMAT)


def parse_timestamp(value: str) -> datetime.datetime:
    return datetime.datetime.strptime(value, TIME_FORMAT).replace(tzinfo=datetime.UTC)


def controller_of(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The object's controller owner reference, if it has one."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r for r in refs if r.get("controller")), None)


def owned_by(obj: dict[str, Any], uid: str) -> bool:
    """Whether the job with ``uid`` controls ``obj`` (a label, or a reference to an earlier job of the same name,
    is not ownership)."""
    ref = controller_of(obj)
    return ref is not None and ref.get("uid") == uid


def is_ours(kind: str, obj: dict[str, Any], uid: str) -> bool:
    """Whether ``obj`` is this job's child: controlled by its UID, or a storage claim the operator made for a job of
    this name and left without an owner so that it outlives the job (``whenDeleted: Retain``); that claim is
    reused."""
    if owned_by(obj, uid):
        return True
    meta = obj.get("metadata") or {}
    made_by_us = (meta.get("labels") or {}).get(builders.MANAGED_BY) == builders.OPERATOR_NAME
    return kind == "PersistentVolumeClaim" and made_by_us and controller_of(obj) is None


def not_owned_message(obj: dict[str, Any]) -> str:
    """Why an existing object cannot be taken over, naming its controller."""
    ref = controller_of(obj)
    holder = f"controlled by {ref.get('kind')} {ref.get('name')} (uid {ref.get('uid')})" if ref else "no controller"
    return f"exists and is not owned by this job ({holder})"


def mint_tokens() -> dict[str, str]:
    return {credentials.JOB_TOKEN: credentials.mint(), credentials.TRAINER_TOKEN: credentials.mint()}


@dataclasses.dataclass(frozen=True)
class Observed:
    """What the executor saw: the job's own children by name, and the coordinator's report if it answered.

    ``foreign`` holds objects that carry the job's label but are not controlled by its UID, by (kind, name): they are
    never counted, changed or deleted; one that holds a name the job needs is a conflict.
    """

    pods: dict[str, dict[str, Any]]
    services: dict[str, dict[str, Any]]
    config_maps: dict[str, dict[str, Any]]
    report: status_api.CoordinatorReport | None = None
    network_policies: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    claims: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    secrets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Fresh tokens the executor drew for this pass: the planner puts them in the job's Secret only when it makes
    # or rotates it (randomness stays out of the planner).
    minted: dict[str, str] = dataclasses.field(default_factory=mint_tokens)
    rotation: str | None = None  # the job's rotate-trainer-token annotation
    foreign: dict[tuple[str, str], dict[str, Any]] = dataclasses.field(default_factory=dict)

    def children(self, kind: str) -> dict[str, dict[str, Any]]:
        """Observed children of one kind, by name."""
        return {"Pod": self.pods, "ConfigMap": self.config_maps, "Service": self.services,
                "NetworkPolicy": self.network_policies, "PersistentVolumeClaim": self.claims,
                "Secret": self.secrets}[kind]  # fmt: skip


def observe(uid: str, listed: dict[str, dict[str, dict[str, Any]]]) -> Observed:
    """Split the label-selected lists (kind -> name -> object) into the job's own children and foreign objects."""
    own = {kind: {n: o for n, o in objs.items() if is_ours(kind, o, uid)} for kind, objs in listed.items()}
    foreign = {(kind, n): o for kind, objs in listed.items() for n, o in objs.items() if n not in own[kind]}
    return Observed(
        pods=own.get("Pod", {}), services=own.get("Service", {}), config_maps=own.get("ConfigMap", {}),
        network_policies=own.get("NetworkPolicy", {}), claims=own.get("PersistentVolumeClaim", {}),
        secrets=own.get("Secret", {}), foreign=foreign,
    )  # fmt: skip


REJECTED = "ChildRejected"
CONFLICT = "ChildConflict"


@dataclasses.dataclass(frozen=True)
class ChildFailure:
    """A write to a child that did not happen: the API server refused it (``ChildRejected``, with the server's own
    message), or its name is held by an object this job does not own (``ChildConflict``)."""

    kind: str
    name: str
    reason: str
    message: str

    @property
    def text(self) -> str:
        verb = "rejected" if self.reason == REJECTED else "not written"
        return f"{self.kind} {self.name} {verb}: {self.message}"


def final_report(pod_status: dict[str, Any]) -> status_api.CoordinatorReport | None:
    """The report an ended coordinator left as its termination message (None: it left none, or a log tail)."""
    for container in pod_status.get("containerStatuses") or []:
        if container.get("name") == "coordinator":
            ended = (container.get("state") or {}).get("terminated") or {}
            return termination.read(ended.get("message"))
    return None


@dataclasses.dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclasses.dataclass
class Plan:
    applies: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    deletes: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (kind, name, uid)
    events: list[Event] = dataclasses.field(default_factory=list)
    failures: list[ChildFailure] = dataclasses.field(default_factory=list)
    status: dict[str, Any] = dataclasses.field(default_factory=dict)
    requeue_after: float | None = None

    def delete(self, kind: str, obj: dict[str, Any]) -> None:
        """Delete exactly this object: the executor sends its UID as a precondition."""
        meta = obj.get("metadata") or {}
        self.deletes.append((kind, meta["name"], meta.get("uid", "")))

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.5)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def pod_is_ready(pod: dict[str, Any]) -> bool:
    """Running and Ready, and not on its way out: a pod being deleted still reports Ready for its grace period."""
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
