"""The planner's vocabulary: what was observed, and the plan (actions, events, status) it produces."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from explorer import status_api, termination

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def timestamp(now: datetime.datetime) -> str:
    """Kubernetes' second-resolution UTC time string."""
    return now.strftime(TIME_FORMAT)


def parse_timestamp(value: str) -> datetime.datetime:
    return datetime.datetime.strptime(value, TIME_FORMAT).replace(tzinfo=datetime.UTC)


@dataclasses.dataclass(frozen=True)
class Observed:
    """What the executor saw: children by name, and the coordinator's report if it answered."""

    pods: dict[str, dict[str, Any]]
    services: dict[str, dict[str, Any]]
    config_maps: dict[str, dict[str, Any]]
    report: status_api.CoordinatorReport | None = None
    network_policies: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def children(self, kind: str) -> dict[str, dict[str, Any]]:
        """Observed non-pod children of one kind, by name."""
        return {"ConfigMap": self.config_maps, "Service": self.services, "NetworkPolicy": self.network_policies}[kind]


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
    deletes: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (kind, name)
    events: list[Event] = dataclasses.field(default_factory=list)
    status: dict[str, Any] = dataclasses.field(default_factory=dict)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.5)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def pod_is_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
