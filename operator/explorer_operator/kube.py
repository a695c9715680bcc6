"""A thin JSON-in/JSON-out layer over the official client's transport (auth, TLS, retries come from it).

The operator works on plain manifests (the builders' dicts), so it talks to the API in raw JSON paths instead of
the generated model classes; server-side apply always uses one field manager.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from explorer_operator import models

FIELD_MANAGER = "explorer-operator"
USER_AGENT = "explorer-operator/0.1.0"
APPLY = "application/apply-patch+yaml"
# Worth retrying unchanged: a timeout, a write conflict, throttling, a server-side failure.
TRANSIENT_STATUSES = frozenset({408, 409, 429})
MESSAGE_LIMIT = 300

# kind -> (API group path, plural) of every child kind the operator owns
CORE_KINDS = {
    "Pod": ("/api/v1", "pods"),
    "Service": ("/api/v1", "services"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Secret": ("/api/v1", "secrets"),
}


class Kube:
    """JSON requests against the API server with the client's configuration."""

    def __init__(self, api: client.ApiClient):
        self.api = api
        # The replica's identity in the audit log: which of several replicas wrote what.
        self.api.user_agent = f"{USER_AGENT} ({socket.gethostname()}-{os.getpid()})"

    def request(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        serialized = self.api.param_serialize(
            method, path, query_params=list(query), header_params=headers,
            # The transport JSON-encodes dicts for JSON types; apply bodies go as a JSON string (valid YAML).
            body=json.dumps(body) if content_type == APPLY else body, auth_settings=["BearerToken"],
        )  # fmt: skip
        response = self.api.call_api(*serialized[:4])
        response.read()
        if not 200 <= response.status < 300:
            raise ApiException(http_resp=response)
        return json.loads(response.data) if response.data else None

    # ---- typed helpers ----------------------------------------------------------------------------
    @staticmethod
    def core_path(namespace: str, kind: str, name: str = "") -> str:
        group, plural = CORE_KINDS[kind]
        base = f"{group}/namespaces/{namespace}/{plural}"
        return f"{base}/{name}" if name else base

    @staticmethod
    def job_path(namespace: str, name: str = "") -> str:
        base = f"/apis/{models.GROUP}/{models.VERSION}/namespaces/{namespace}/{models.PLURAL}"
        return f"{base}/{name}" if name else base

    def get_core(self, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
        try:
            obj: dict[str, Any] = self.request("GET", self.core_path(namespace, kind, name))
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return obj

    def apply(self, obj: dict[str, Any]) -> Any:
        path = self.core_path(obj["metadata"]["namespace"], obj["kind"], obj["metadata"]["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return self.request("PATCH", path, query, body=obj, content_type=APPLY)

    def create(self, obj: dict[str, Any]) -> bool:
        """Create ``obj``; False when its name is taken already (409), which the caller reads to see by whom."""
        try:
            self.request("POST", self.core_path(obj["metadata"]["namespace"], obj["kind"]), body=obj)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def delete(self, namespace: str, kind: str, name: str, uid: str) -> None:
        """Delete the object only if it still is the one with ``uid``: gone (404) or replaced (409, the precondition
        failed) both count as done."""
        body: dict[str, Any] = {"propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.request("DELETE", self.core_path(namespace, kind, name), body=body)
        except ApiException as err:
            if err.status not in (404, 409):
                raise

    def apply_job_status(self, namespace: str, name: str, status: dict[str, Any]) -> Any:
        """Apply the status; returns the job as the write left it."""
        body = {"apiVersion": models.API_VERSION, "kind": models.KIND, "metadata": {"name": name}, "status": status}
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return self.request("PATCH", self.job_path(namespace, name) + "/status", query, body=body, content_type=APPLY)

    def post_event(self, job: dict[str, Any], type_: str, reason: str, note: str, event_time: str) -> None:
        meta = job["metadata"]
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}-", "namespace": meta["namespace"]},
            "eventTime": event_time,
            "reportingController": f"{models.GROUP}/operator",
            "reportingInstance": FIELD_MANAGER,
            "action": reason,
            "reason": reason,
            "note": note[:1024],
            "type": type_,
            "regarding": {
                "apiVersion": models.API_VERSION, "kind": models.KIND, "name": meta["name"],
                "namespace": meta["namespace"], "uid": meta["uid"],
            },
        }  # fmt: skip
        self.request("POST", f"/apis/events.k8s.io/v1/namespaces/{meta['namespace']}/events", body=body)


def is_transient(err: BaseException) -> bool:
    """Whether a failed request should be retried with backoff rather than reported as a refusal: no answer at all
    (connection, TLS, timeout), or an answer that says "later"."""
    if isinstance(err, urllib3.exceptions.HTTPError | OSError):
        return True
    status = (err.status or 0) if isinstance(err, ApiException) else 0
    return status in TRANSIENT_STATUSES or status >= 500


def error_message(err: ApiException) -> str:
    """The API server's own short account of a refusal: the ``message`` of its Status body."""
    try:
        body = json.loads(err.body or "")
    except ValueError:
        body = None
    message = body.get("message") if isinstance(body, dict) else None
    text = str(message or f"{err.status} {err.reason}")
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def namespace_terminating(err: ApiException) -> bool:
    return err.status == 403 and "NamespaceTerminating" in (err.body or "")
