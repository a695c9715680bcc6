"""Status computation: phase, counts and API-convention conditions from the observed pods and coordinator report.

Ready is honest: every engine and the coordinator pass their probes and, once the runtime reports it, every engine
has joined the sync group at the current policy version. Pod-level causes show under Degraded with the pod's own
reason. A child the API server refused, or whose name another object holds, shows under Degraded too
(``ChildRejected`` / ``ChildConflict``, with the server's message), gets one Warning event, is retried with backoff,
and is named when the startup deadline fails the job. A job that is not Ready within its startup deadline fails with
a message naming the pods that held it up.
"""

from __future__ import annotations

import datetime
from typing import Any

from explorer_operator import builders, models
from explorer_operator.world import ChildFailure, Event, Observed, Plan, parse_timestamp, pod_is_ready, timestamp

CONDITION_ORDER: tuple[models.ConditionType, ...] = (
    "Ready",
    "Progressing",
    "Degraded",
    "Synced",
    "Suspended",
    "Failed",
)
POD_TROUBLE = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError", "CrashLoopBackOff")
TERMINAL = ("Succeeded", "Failed")
POLL_SECONDS = 5.0
# Retrying a refused child: after as long as it has been refused, within these bounds (a doubling backoff).
CHILD_RETRY_MIN_SECONDS = 5.0
CHILD_RETRY_MAX_SECONDS = 30.0


def set_condition(
    existing: list[models.Condition],
    type_: models.ConditionType,
    status: str,
    reason: str,
    message: str,
    now: datetime.datetime,
    generation: int | None = None,
) -> list[models.Condition]:
    """Set one condition, keeping its lastTransitionTime when its status did not change."""
    old = next((c for c in existing if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else timestamp(now)
    new = models.Condition.model_validate(
        {"type": type_, "status": status, "reason": reason, "message": message[:1024],
         "lastTransitionTime": since, "observedGeneration": generation}
    )  # fmt: skip
    merged = {c.type: c for c in existing}
    merged[type_] = new
    return [merged[t] for t in CONDITION_ORDER if t in merged]


def pod_trouble(name: str, pod: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when a pod is stuck for a pod-level cause (scheduling, image, config)."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond.get("reason") or "Unschedulable", f"{name}: {cond.get('message', '')}"
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in POD_TROUBLE:
            return waiting["reason"], f"{name}: {waiting.get('message', waiting['reason'])}"
    return None


def claim_troubles(
    job: builders.JobRef, spec: models.ExplorerJobSpec, observed: Observed, live: dict[str, dict[str, Any]]
) -> list[tuple[str, str]]:
    """Why the job's storage holds the coordinator up: the user's claim does not exist, a claim waits for a volume
    while the coordinator cannot be scheduled, or a claim lost its volume (and the data on it)."""
    name = builders.claim_name(job, spec)
    if name is None:
        return []
    claim = observed.claims.get(name)
    coordinator = live.get(f"{job.name}-coordinator") or {}
    conditions = (coordinator.get("status") or {}).get("conditions") or []
    unscheduled = any(c.get("type") == "PodScheduled" and c.get("status") == "False" for c in conditions)
    started = (coordinator.get("status") or {}).get("phase") in ("Running", "Succeeded")
    if claim is None:
        if spec.storage is not None and spec.storage.existing_claim and not started:
            return [("ClaimNotFound", f"spec.storage.existingClaim: PersistentVolumeClaim {name} does not exist in "
                     f"namespace {job.namespace}; create it, or name an existing claim")]  # fmt: skip
        return []
    phase = (claim.get("status") or {}).get("phase")
    if phase == "Lost":
        return [("ClaimLost", f"PersistentVolumeClaim {name} lost its PersistentVolume: the experience log and "
                 "resume state on it are gone; restore the volume, or delete the job and start over")]  # fmt: skip
    if phase == "Pending" and unscheduled:
        wanted = (claim.get("spec") or {}).get("storageClassName") or "the default StorageClass"
        return [("ClaimNotBound", f"PersistentVolumeClaim {name} is not bound to a volume yet ({wanted}): the "
                 "coordinator cannot start until it is; check the StorageClass or create a matching "
                 "PersistentVolume")]  # fmt: skip
    return []


def compute(
    job: builders.JobRef,
    spec: models.ExplorerJobSpec,
    status: models.ExplorerJobStatus,
    observed: Observed,
    desired: dict[str, dict[str, Any]],
    now: datetime.datetime,
    result: Plan,
) -> None:
    """Fill counts, phase and conditions of ``status`` in place; ask for a requeue when time matters."""
    gen = status.observed_generation
    live = {n: p for n, p in observed.pods.items() if not (p.get("metadata") or {}).get("deletionTimestamp")}
    engines = [
        n for n, p in desired.items() if p["metadata"]["labels"].get(builders.GROUP_LABEL) == builders.ROLLOUT_GROUP
    ]
    status.engines.current = sum(1 for n in engines if n in live)
    status.engines.ready = sum(1 for n in engines if n in live and pod_is_ready(live[n]))
    report = observed.report
    ended = status.phase in TERMINAL
    if report is not None:
        _take_report(status, report, ended)

    def cond(type_: models.ConditionType, value: str, reason: str, message: str = "") -> None:
        status.conditions = set_condition(status.conditions, type_, value, reason, message, now, gen)

    cond("Suspended", "True" if spec.suspend and status.phase == "Suspended" else "False",
         "Suspended" if status.phase == "Suspended" else "NotSuspended")  # fmt: skip
    _synced(status, report, ended, cond)
    unwritten = _report_failures(status, result.failures, now, result)
    if status.phase in ("Succeeded", "Failed", "Suspended"):
        cond("Ready", "False", status.phase, f"job is {status.phase}")
        cond("Progressing", "False", status.phase)
        _degraded(unwritten, status.phase, cond)
        if status.phase != "Failed":
            cond("Failed", "False", "NoFailure")
        return

    all_ready = bool(desired) and all(n in live and pod_is_ready(live[n]) for n in desired)
    sync_known = report is not None and report.engines_in_sync is not None
    ready = all_ready and (not sync_known or status.engines.in_sync >= status.engines.desired)
    troubles = unwritten + claim_troubles(job, spec, observed, live)
    troubles += [t for n, p in live.items() if (t := pod_trouble(n, p))]
    troubles += [("Restarting", f"{p.pod}: {p.reason}; recreated at {p.not_before}") for p in status.pending_restarts]
    if report is not None and report.trainer_overdue:
        troubles.append(("TrainerOverdue", report.waiting_for or "the trainer's push is overdue"))
    _degraded(troubles, "NoPodProblems", cond)

    if ready:
        status.phase = "Running"
        status.ready_time = status.ready_time or timestamp(now)
        cond("Ready", "True", "AllEnginesReady", f"{status.engines.ready}/{status.engines.desired} engines ready")
        cond("Progressing", "True", "Exploring", f"step {status.step} of {status.total_steps}")
    else:
        status.phase = "Running" if status.ready_time else ("Initializing" if live else "Pending")
        waiting = [n for n in desired if not (n in live and pod_is_ready(live[n]))]
        reason = "EnginesNotInSync" if all_ready else "PodsNotReady"
        detail = (f"{status.engines.in_sync}/{status.engines.desired} engines in sync" if all_ready
                  else f"not ready: {', '.join(waiting)}")  # fmt: skip
        detail = "; ".join([detail, *(m for _, m in unwritten)])
        cond("Ready", "False", reason, detail)
        cond("Progressing", "True", "Recovering" if status.ready_time else "Starting", detail)
        if _check_startup_deadline(spec, status, detail, now, result, cond):
            return
    cond("Failed", "False", "NoFailure")
    coordinator = live.get(f"{job.name}-coordinator")
    if coordinator is not None and (coordinator.get("status") or {}).get("phase") == "Running":
        result.requeue(POLL_SECONDS)


def _take_report(status: models.ExplorerJobStatus, report: Any, ended: bool) -> None:
    status.step = report.step
    status.policy_version = report.policy_version
    status.eval = dict(report.eval)
    # An ended coordinator's final report counts engines that may be gone by now.
    in_sync = report.engines_in_sync or 0
    status.engines.in_sync = in_sync if ended else min(in_sync, status.engines.ready)
    if report.last_sync_time:
        status.last_sync = models.LastSync(
            time=report.last_sync_time, duration_seconds=report.last_sync_duration_seconds,
            bytes=report.last_sync_bytes,
        )  # fmt: skip


def _degraded(troubles: list[tuple[str, str]], healthy_reason: str, cond: Any) -> None:
    if troubles:
        cond("Degraded", "True", troubles[0][0], "; ".join(m for _, m in troubles))
    else:
        cond("Degraded", "False", healthy_reason)


def _report_failures(
    status: models.ExplorerJobStatus, failures: list[ChildFailure], now: datetime.datetime, result: Plan
) -> list[tuple[str, str]]:
    """Degraded troubles for the children not written; a Warning event for each the last status did not already
    name (so a lasting refusal is reported once), and a retry that backs off while the refusals last."""
    if not failures:
        return []
    old = next((c for c in status.conditions if c.type == "Degraded" and c.status == "True"), None)
    reported = old.message if old is not None else ""
    for failure in failures:
        if failure.text not in reported:
            result.events.append(Event("Warning", failure.reason, failure.text))
    lasted = (now - parse_timestamp(old.last_transition_time)).total_seconds() if old is not None else 0.0
    result.requeue(min(max(lasted, CHILD_RETRY_MIN_SECONDS), CHILD_RETRY_MAX_SECONDS))
    return [(f.reason, f.text) for f in failures]


def _synced(status: models.ExplorerJobStatus, report: Any, ended: bool, cond: Any) -> None:
    if report is None and ended and any(c.type == "Synced" and c.status != "Unknown" for c in status.conditions):
        return  # no coordinator left to ask: its last word stands
    if report is None:
        cond("Synced", "Unknown", "NoReport", "the coordinator has not reported yet")
    elif report.policy_version is None:
        cond("Synced", "Unknown", "AwaitingFirstSync", "no weights pushed yet")
    elif status.engines.in_sync >= status.engines.desired:
        cond("Synced", "True", "InSync", f"all engines serve policy version {report.policy_version}")
    else:
        behind = f"{status.engines.in_sync}/{status.engines.desired} engines at version {report.policy_version}"
        cond("Synced", "False", "EnginesBehind", behind)


def _check_startup_deadline(
    spec: models.ExplorerJobSpec,
    status: models.ExplorerJobStatus,
    detail: str,
    now: datetime.datetime,
    result: Plan,
    cond: Any,
) -> bool:
    """Fail the job when it missed its startup deadline (True); otherwise requeue for the deadline."""
    if status.ready_time or not status.start_time:
        return False
    started = parse_timestamp(status.start_time)
    remaining = started + datetime.timedelta(seconds=spec.startup_deadline_seconds) - now
    if remaining.total_seconds() > 0:
        result.requeue(remaining.total_seconds())
        return False
    message = f"not Ready within startupDeadlineSeconds={spec.startup_deadline_seconds}: {detail}"
    status.phase = "Failed"
    status.completion_time = timestamp(now)
    cond("Failed", "True", "StartupDeadlineExceeded", message)
    cond("Ready", "False", "Failed", message)
    result.events.append(Event("Warning", "StartupDeadlineExceeded", message))
    result.requeue(0.5)  # the next pass removes the pods of the failed job
    return True
