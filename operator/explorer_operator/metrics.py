"""Prometheus metrics of the operator: reconcile latency, time to Ready, restarts, jobs by phase, events."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from explorer_operator import models
from explorer_operator.world import parse_timestamp

RECONCILE_SECONDS = Histogram("explorer_operator_reconcile_seconds", "Duration of one reconcile pass")
RECONCILES = Counter("explorer_operator_reconciles_total", "Reconcile passes")
RECONCILE_ERRORS = Counter("explorer_operator_reconcile_errors_total", "Reconcile passes that raised")
TIME_TO_READY = Histogram(
    "explorer_operator_time_to_ready_seconds", "From job creation to first Ready",
    buckets=(1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)  # fmt: skip
RESTARTS = Counter("explorer_operator_pod_restarts_total", "Pods replaced after failing")
EVENTS = Counter("explorer_operator_events_total", "Kubernetes events posted", ["reason"])
JOBS = Gauge("explorer_operator_jobs", "ExplorerJobs by phase", ["phase"])

_phases: dict[tuple[str, str], str] = {}


def _refresh_phase_gauge() -> None:
    for phase in ("Pending", "Initializing", "Running", "Succeeded", "Failed", "Suspended"):
        JOBS.labels(phase=phase).set(sum(1 for p in _phases.values() if p == phase))


def job_transition(
    namespace: str, name: str, meta: dict[str, Any], previous: models.ExplorerJobStatus, status: dict[str, Any]
) -> None:
    """Account for a status change the reconciler just wrote."""
    _phases[(namespace, name)] = status.get("phase", "Pending")
    _refresh_phase_gauge()
    if status.get("readyTime") and not previous.ready_time and meta.get("creationTimestamp"):
        TIME_TO_READY.observe(
            (parse_timestamp(status["readyTime"]) - parse_timestamp(meta["creationTimestamp"])).total_seconds()
        )
    restarted = status.get("restarts", 0) - previous.restarts
    if restarted > 0:
        RESTARTS.inc(restarted)


def forget_job(namespace: str, name: str) -> None:
    if _phases.pop((namespace, name), None) is not None:
        _refresh_phase_gauge()
