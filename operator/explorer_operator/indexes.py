"""kopf indexes: the operator's in-memory view of its jobs and their children, kept by the watches it already has.

A reconcile reads the job and its children from here instead of a GET and four LISTs, so a job left alone costs
the API server nothing. Child watches are filtered server-side to objects that carry the job label (objects in
other namespaces or of other owners never reach the operator); objects carrying it but controlled by another UID
are kept too, so a name held by someone else is still seen as a conflict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import kopf

from explorer_operator import builders, kube, models

JobKey = tuple[str, str]  # (namespace, job name)

JOB_INDEX = "explorer_jobs"


def _selector(group_path: str, plural: str) -> tuple[str, str]:
    """kopf's (group or core version, plural) for an API path: "/api/v1" is core, "/apis/<group>/<v>" a group."""
    return group_path.strip("/").split("/")[1], plural


# kind -> (kopf resource selector, index id), one per child kind the operator owns (kube.CORE_KINDS); an index
# reaches handlers as a keyword argument named by its id
CHILD_RESOURCES = {
    kind: (_selector(group_path, plural), f"explorer_{plural}")
    for kind, (group_path, plural) in kube.CORE_KINDS.items()
}


class View(Protocol):
    """What a reconcile reads: one job, and its labelled children by kind and name."""

    def job(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def children(self, namespace: str, name: str) -> dict[str, dict[str, dict[str, Any]]]: ...


def _slim(body: Mapping[str, Any]) -> dict[str, Any]:
    """The object without its managedFields: the planner never reads them and they are most of an object's size."""
    obj = dict(body)
    obj["metadata"] = {k: v for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return obj


def explorer_jobs(namespace: str | None, name: str, body: kopf.Body, **_: Any) -> dict[JobKey, dict[str, Any]]:
    return {(namespace or "", name): _slim(body)}


def by_job_label(namespace: str | None, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[JobKey, Any]:
    return {(namespace or "", labels[builders.JOB_LABEL]): _slim(body)}


def register() -> None:
    """Register the indexes with kopf (``handlers`` calls this at import)."""
    kopf.index(models.GROUP, models.VERSION, models.PLURAL, id=JOB_INDEX)(explorer_jobs)
    for resource, index in CHILD_RESOURCES.values():
        kopf.index(*resource, id=index, labels={builders.JOB_LABEL: kopf.PRESENT})(by_job_label)


def filter_server_side(settings: kopf.OperatorSettings) -> None:
    """Only labelled children travel from the API server: unrelated pods cost neither bandwidth nor memory."""
    for resource, _ in CHILD_RESOURCES.values():
        settings.watching.label_selectors[resource] = builders.JOB_LABEL


class KopfView:
    """The ``View`` over kopf's indexes (handed to the startup handler as keyword arguments)."""

    def __init__(self, indices: Mapping[str, Any]):
        self._jobs = indices[JOB_INDEX]
        self._children = {kind: indices[index] for kind, (_, index) in CHILD_RESOURCES.items()}

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        store: Iterable[dict[str, Any]] = self._jobs.get((namespace, name), ())
        return next(iter(store), None)

    def children(self, namespace: str, name: str) -> dict[str, dict[str, dict[str, Any]]]:
        return {
            kind: {obj["metadata"]["name"]: obj for obj in index.get((namespace, name), ())}
            for kind, index in self._children.items()
        }
