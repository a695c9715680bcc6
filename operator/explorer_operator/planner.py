"""The pure planner: observed world in, the next actions and the job's status out.

``plan`` decides what to apply and delete (missing children, restarts with backoff inside the budget, one-at-a-time
replacement of changed engines, scale-down, suspend, completion cleanup) and computes the status from what it saw.
It sees only the job's own children (controlled by its UID): a name held by anything else is a ``ChildConflict``,
reported and never written; deletes name the UID they mean. The executor in ``reconcile`` only performs the plan;
nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

from explorer import credentials, termination
from explorer_operator import builders, conditions, models
from explorer_operator.world import (
    CONFLICT,
    ChildFailure,
    Event,
    Observed,
    Plan,
    not_owned_message,
    parse_timestamp,
    pod_is_ready,
    timestamp,
)


def _hash(obj: dict[str, Any] | None) -> str | None:
    if not obj:
        return None
    value: str | None = (obj.get("metadata", {}).get("annotations") or {}).get(builders.HASH_ANNOTATION)
    return value


def pod_failure(pod: dict[str, Any]) -> str:
    """A one-line account of why a pod ended, from its own status."""
    status = pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            detail = _last_words(term.get("message") or "")
            return f"{term.get('reason', 'Error')} (exit {term.get('exitCode')}){': ' + detail if detail else ''}"
    return str(status.get("reason") or status.get("message") or status.get("phase", "Unknown"))


def _last_words(message: str, limit: int = 600) -> str:
    """What a terminated container left: the coordinator's report message, or the tail of a crashed process's log
    (``FallbackToLogsOnError``), where the error is at the end."""
    report = termination.read(message)
    text = report.message if report is not None else message
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    tail = " | ".join(lines[-4:])
    return tail if len(tail) <= limit else "…" + tail[-limit:]


def backoff_seconds(policy: models.RestartPolicySpec, restarts: int) -> float:
    return float(min(policy.backoff_seconds * (2**restarts), policy.max_backoff_seconds))


def plan(
    job: builders.JobRef,
    generation: int,
    spec: models.ExplorerJobSpec,
    previous: models.ExplorerJobStatus,
    observed: Observed,
    now: datetime.datetime,
    failures: Sequence[ChildFailure] = (),
) -> Plan:
    """Decide the next actions for one job and compute its status.

    ``failures`` are the writes of this pass's earlier plan that did not happen: the executor plans again with them,
    so status, events and the startup deadline account for children that could not be written.
    """
    result = Plan(failures=list(failures))
    status = previous.model_copy(deep=True)
    status.observed_generation = generation
    status.total_steps = spec.explore.total_steps
    status.sync = models.SyncStatus(address=builders.sync_address(job, spec))
    status.engines.desired = spec.engines.replicas
    status.engines.selector = builders.engine_selector(job)

    _plan_static_children(job, spec, observed, result)
    _plan_credentials(job, observed, result)
    status.sync.credentials_secret = builders.credentials_name(job)
    desired_pods = builders.build_desired_pods(job, spec)
    coordinator_name = f"{job.name}-coordinator"

    if status.phase not in conditions.TERMINAL:
        _detect_completion(status, observed, coordinator_name, now, result)
    if status.phase in conditions.TERMINAL:
        _cleanup_terminal(spec, status, observed, coordinator_name, result)
    elif spec.suspend:
        for pod in observed.pods.values():
            result.delete("Pod", pod)
        status.pending_restarts = []
        status.start_time = None
        status.ready_time = None
        if status.phase != "Suspended":
            result.events.append(Event("Normal", "Suspended", "Job suspended: every pod removed"))
        status.phase = "Suspended"
    else:
        if status.phase == "Suspended":
            status.phase = "Pending"
            result.events.append(Event("Normal", "Resumed", "Job resumed: recreating pods"))
        _plan_pods(job, spec, status, observed, desired_pods, now, result)

    conditions.compute(job, spec, status, observed, desired_pods, now, result)
    result.status = status.to_wire()
    return result


def _plan_static_children(job: builders.JobRef, spec: models.ExplorerJobSpec, observed: Observed, result: Plan) -> None:
    for child in builders.build_static_children(job, spec):
        kind, name = child["kind"], child["metadata"]["name"]
        existing = observed.children(kind).get(name)
        if existing is None and _conflict(kind, name, observed, result):
            continue
        if _hash(existing) != _hash(child):
            result.applies.append(child)


def _plan_credentials(job: builders.JobRef, observed: Observed, result: Plan) -> None:
    """The job's Secret: made once with the executor's fresh tokens; its trainer token rotated when the job's
    rotate annotation names a value the Secret was not rotated for (the old token stays valid as the previous one).
    A rotation carries the observed resourceVersion, so a stale view can never rotate twice."""
    name = builders.credentials_name(job)
    existing = observed.secrets.get(name)
    if existing is None:
        if not _conflict("Secret", name, observed, result):
            result.applies.append(builders.build_credentials(job, observed.minted, observed.rotation))
        return
    rotated_for = (existing["metadata"].get("annotations") or {}).get(builders.ROTATED_FOR_ANNOTATION)
    if observed.rotation is None or observed.rotation == rotated_for:
        return
    job_token = builders.secret_token(existing, credentials.JOB_TOKEN) or observed.minted[credentials.JOB_TOKEN]
    tokens = {credentials.JOB_TOKEN: job_token, credentials.TRAINER_TOKEN: observed.minted[credentials.TRAINER_TOKEN]}
    previous = builders.secret_token(existing, credentials.TRAINER_TOKEN)
    if previous:
        tokens[credentials.PREVIOUS_TRAINER_TOKEN] = previous
    secret = builders.build_credentials(job, tokens, observed.rotation)
    secret["metadata"]["resourceVersion"] = existing["metadata"].get("resourceVersion")
    result.applies.append(secret)
    result.events.append(Event("Normal", "TrainerTokenRotated", f"Secret {name}: new trainer-token; the previous one "
                               "is accepted until the next rotation"))  # fmt: skip


def _conflict(kind: str, name: str, observed: Observed, result: Plan) -> bool:
    """A name the job needs held by an object it does not own: reported, never overwritten."""
    holder = observed.foreign.get((kind, name))
    if holder is not None:
        result.failures.append(ChildFailure(kind, name, CONFLICT, not_owned_message(holder)))
    return holder is not None


def _detect_completion(
    status: models.ExplorerJobStatus, observed: Observed, coordinator: str, now: datetime.datetime, result: Plan
) -> None:
    pod = observed.pods.get(coordinator)
    pod_phase = ((pod or {}).get("status") or {}).get("phase")
    reported = observed.report.phase if observed.report else None
    if pod_phase == "Succeeded" or reported == "Succeeded":
        status.phase = "Succeeded"
        status.completion_time = timestamp(now)
        result.events.append(Event("Normal", "Succeeded", "The explorer finished every step"))
    elif pod_phase == "Failed" and observed.report is not None and observed.report.failure_reason:
        # A failure the explorer calls final (no push from the trainer in time): a new coordinator would only wait
        # again, so the job fails without spending its restart budget.
        reason, message = observed.report.failure_reason, observed.report.message
        status.phase = "Failed"
        status.completion_time = timestamp(now)
        status.conditions = conditions.set_condition(status.conditions, "Failed", "True", reason, message, now)
        result.events.append(Event("Warning", reason, message))


def _cleanup_terminal(
    spec: models.ExplorerJobSpec,
    status: models.ExplorerJobStatus,
    observed: Observed,
    coordinator: str,
    result: Plan,
) -> None:
    keep_coordinator = status.phase == "Succeeded" and spec.on_completion != "DeleteAll"
    keep_engines = status.phase == "Succeeded" and spec.on_completion == "KeepAll"
    for name, pod in observed.pods.items():
        if (name == coordinator and not keep_coordinator) or (name != coordinator and not keep_engines):
            result.delete("Pod", pod)
    status.pending_restarts = []


def _plan_pods(
    job: builders.JobRef,
    spec: models.ExplorerJobSpec,
    status: models.ExplorerJobStatus,
    observed: Observed,
    desired: dict[str, dict[str, Any]],
    now: datetime.datetime,
    result: Plan,
) -> None:
    if status.start_time is None:
        status.start_time = timestamp(now)
    pending = {p.pod: p for p in status.pending_restarts}
    for name, existing in observed.pods.items():
        if name not in desired:
            result.delete("Pod", existing)  # scaled down, or an engine group removed

    replacing = False
    for name, pod in desired.items():
        current = observed.pods.get(name)
        if current is None:
            waiting = pending.get(name)
            if waiting and parse_timestamp(waiting.not_before) > now:
                result.requeue((parse_timestamp(waiting.not_before) - now).total_seconds())
                continue
            if _conflict("Pod", name, observed, result):
                continue
            pending.pop(name, None)
            result.applies.append(pod)
            continue
        phase = (current.get("status") or {}).get("phase")
        ended = phase == "Failed" or (phase == "Succeeded" and name != f"{job.name}-coordinator")
        if ended and name in pending:
            result.delete("Pod", current)  # already counted; its deletion is not visible yet
            continue
        if ended:
            if not _restart(spec, status, name, current, now, pending, result):
                status.pending_restarts = list(pending.values())
                return
            continue
        if _hash(current) != _hash(pod) and not current.get("metadata", {}).get("deletionTimestamp"):
            # Replace one changed pod at a time, and only while every other desired pod is ready.
            others_ready = all(n == name or (n in observed.pods and pod_is_ready(observed.pods[n])) for n in desired)
            if not replacing and others_ready:
                replacing = True
                result.delete("Pod", current)
                result.events.append(Event("Normal", "Replacing", f"Pod {name} runs an outdated template"))
    status.pending_restarts = list(pending.values())


def _restart(
    spec: models.ExplorerJobSpec,
    status: models.ExplorerJobStatus,
    name: str,
    pod: dict[str, Any],
    now: datetime.datetime,
    pending: dict[str, models.PendingRestart],
    result: Plan,
) -> bool:
    """Replace a failed pod after a backoff; False when the restart budget is spent (the job failed)."""
    why = pod_failure(pod)
    budget = spec.restart_policy.max_restarts
    if status.restarts >= budget:
        status.phase = "Failed"
        status.completion_time = timestamp(now)
        message = f"pod {name} failed: {why}; restart budget of {budget} used up"
        status.conditions = conditions.set_condition(
            status.conditions, "Failed", "True", "RestartBudgetExceeded", message, now
        )
        result.events.append(Event("Warning", "RestartBudgetExceeded", message))
        result.delete("Pod", pod)
        return False
    delay = backoff_seconds(spec.restart_policy, status.restarts)
    status.restarts += 1
    not_before = now + datetime.timedelta(seconds=delay)
    pending[name] = models.PendingRestart(pod=name, not_before=timestamp(not_before), reason=why)
    result.delete("Pod", pod)
    result.events.append(
        Event("Warning", "PodFailed", f"pod {name} failed: {why}; recreating in {delay:.0f}s "
              f"(restart {status.restarts} of {budget})")
    )  # fmt: skip
    result.requeue(delay)
    return True
