"""The executor: observe one ExplorerJob's world, run the planner, perform its plan, write status only on change.

It observes from kopf's indexes (``indexes``), so a pass costs API requests only for what it changes.

Every write of the plan is attempted and its outcome kept: a refused or conflicting child never aborts the pass.
The planner then runs again with those failures, so status, events and the startup deadline always reflect them;
transient errors (timeouts, conflicts, throttling, 5xx) are retried through the controller's backoff instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import time
from typing import Any

import httpx
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from explorer import credentials, status_api
from explorer_operator import builders, conditions, indexes, kube, metrics, models, planner, validation, world
from explorer_operator.world import (
    CONFLICT,
    REJECTED,
    ChildFailure,
    Observed,
    Plan,
    final_report,
    is_ours,
    not_owned_message,
)

log = logging.getLogger(__name__)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _normalised_status(raw: dict[str, Any] | None) -> tuple[models.ExplorerJobStatus, dict[str, Any] | None]:
    try:
        parsed = models.ExplorerJobStatus.model_validate(raw or {})
    except ValidationError:
        return models.ExplorerJobStatus(), None
    return parsed, parsed.to_wire() if raw else None


class TransientWriteError(Exception):
    """Writes that failed for a reason worth retrying unchanged; raised after status, so the pass backs off."""


@dataclasses.dataclass
class _Outcome:
    failures: list[ChildFailure] = dataclasses.field(default_factory=list)
    transient: list[str] = dataclasses.field(default_factory=list)
    terminating: bool = False

    def add(self, kind: str, name: str, err: BaseException) -> None:
        if kube.is_transient(err):
            self.transient.append(f"{kind} {name}: {err}")
        elif isinstance(err, ApiException):
            self.terminating = self.terminating or kube.namespace_terminating(err)
            self.failures.append(ChildFailure(kind, name, REJECTED, kube.error_message(err)))
        else:
            raise err  # a bug, not the API server's answer


def _validation_message(err: ValidationError) -> str:
    return "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()[:5])


@dataclasses.dataclass(frozen=True)
class _Written:
    before: str  # the job's resourceVersion the write was planned from
    job: dict[str, Any]  # the API server's answer: the job as the write left it


class Reconciler:
    """Reconciles jobs by (namespace, name); every Kubernetes call runs in a worker thread."""

    def __init__(self, api: kube.Kube, http: httpx.AsyncClient, view: indexes.View):
        self.api = api
        self.http = http
        self.view = view
        self._written: dict[tuple[str, str], _Written] = {}

    def wrote(self, namespace: str, name: str, resource_version: str) -> bool:
        """Whether this version of the job is the one our own last status write made (its watch event is news to
        nobody, so it needs no pass)."""
        written = self._written.get((namespace, name))
        return written is not None and written.job["metadata"].get("resourceVersion") == resource_version

    def _job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The job from the index, or the answer to our own status write while the index has not seen it yet (so
        a pass never plans from a status older than the one it wrote: no restart is counted twice)."""
        job = self.view.job(namespace, name)
        written = self._written.get((namespace, name))
        if written is None:
            return job
        if job is not None and job["metadata"].get("resourceVersion") == written.before:
            return written.job
        if job is None or job["metadata"].get("resourceVersion") != written.job["metadata"].get("resourceVersion"):
            del self._written[(namespace, name)]  # the watch has caught up (or moved on)
        return job

    async def _write_status(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        meta = job["metadata"]
        answer = await asyncio.to_thread(self.api.apply_job_status, meta["namespace"], meta["name"], status)
        if isinstance(answer, dict) and "metadata" in answer:
            self._written[(meta["namespace"], meta["name"])] = _Written(meta.get("resourceVersion", ""), answer)

    async def reconcile(self, namespace: str, name: str) -> float | None:
        """One pass; returns seconds until the job wants another pass (None: wait for events)."""
        started = time.monotonic()
        try:
            return await self._reconcile(namespace, name)
        finally:
            metrics.RECONCILE_SECONDS.observe(time.monotonic() - started)
            metrics.RECONCILES.inc()

    async def _reconcile(self, namespace: str, name: str) -> float | None:
        job = self._job(namespace, name)
        if job is None:
            metrics.forget_job(namespace, name)
            return None
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):
            return None  # going away: garbage collection removes the children
        ref = builders.JobRef(name=name, namespace=namespace, uid=meta["uid"])
        previous, observed_status = _normalised_status(job.get("status"))
        failed = next((c for c in previous.conditions if c.type == "Failed" and c.status == "True"), None)
        try:
            spec = models.ExplorerJobSpec.model_validate(job.get("spec") or {})
            problems = validation.job_problems(name, spec)
        except ValidationError as err:
            problems = [_validation_message(err)]
        if problems:
            await self._invalid(job, previous, observed_status, "; ".join(problems))
            return None
        if failed is not None and failed.reason == "InvalidSpec":
            previous.phase = "Pending"  # the spec was fixed: start over
            previous.conditions = [c for c in previous.conditions if c.type != "Failed"]

        observed = await self._observe(ref, spec, (meta.get("annotations") or {}).get(builders.ROTATE_ANNOTATION))
        now = _now()
        generation = meta.get("generation", 0)
        result = planner.plan(ref, generation, spec, previous, observed, now)
        outcome = await self._perform(ref, result, observed)
        if outcome.terminating:
            return None  # the namespace (and with it this job) is being deleted
        if outcome.failures:
            result = planner.plan(ref, generation, spec, previous, observed, now, outcome.failures)
        for event in result.events:
            await self._event(job, event.type, event.reason, event.message, now)
        if result.status != observed_status:
            await self._write_status(job, result.status)
            metrics.job_transition(namespace, name, meta, previous, result.status)
        if outcome.transient:
            raise TransientWriteError("; ".join(outcome.transient))
        return result.requeue_after

    async def _perform(self, ref: builders.JobRef, result: Plan, observed: Observed) -> _Outcome:
        """Every apply, then every delete, each outcome kept (independent objects: the API server orders nothing
        between them, so each batch runs concurrently)."""
        outcome = _Outcome()
        applied = await asyncio.gather(
            *(self._apply(ref, obj, observed) for obj in result.applies), return_exceptions=True
        )
        for obj, done in zip(result.applies, applied, strict=True):
            if isinstance(done, ChildFailure):
                outcome.failures.append(done)
            elif isinstance(done, BaseException):
                outcome.add(obj["kind"], obj["metadata"]["name"], done)
        deletes = list(dict.fromkeys(result.deletes))
        deleted = await asyncio.gather(
            *(asyncio.to_thread(self.api.delete, ref.namespace, k, n, uid) for k, n, uid in deletes),
            return_exceptions=True,
        )
        for (kind, name, _), done in zip(deletes, deleted, strict=True):
            if isinstance(done, BaseException):
                outcome.add(kind, name, done)
        return outcome

    async def _apply(self, ref: builders.JobRef, obj: dict[str, Any], observed: Observed) -> ChildFailure | None:
        """Server-side apply (forced: the operator owns every field it sets), but never onto an object another
        controller, or no controller, holds: that is a conflict to report, not a child to take over. A child the
        index already shows as ours needs no look; a new name is read first, since an unlabelled holder of it is
        invisible to the index."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        if kind == "Secret":
            return await self._write_secret(ref, obj)
        if name not in observed.children(kind):
            existing = await asyncio.to_thread(self.api.get_core, ref.namespace, kind, name)
            if existing is not None and not is_ours(kind, existing, ref.uid):
                return ChildFailure(kind, name, CONFLICT, not_owned_message(existing))
        await asyncio.to_thread(self.api.apply, obj)
        return None

    async def _write_secret(self, ref: builders.JobRef, obj: dict[str, Any]) -> ChildFailure | None:
        """The job's Secret is created, never applied over: a view that has not seen it yet must not replace its
        tokens. A rotation (it carries the resourceVersion it read) is an apply the server refuses if stale."""
        if obj["metadata"].get("resourceVersion"):
            await asyncio.to_thread(self.api.apply, obj)
            return None
        if await asyncio.to_thread(self.api.create, obj):
            return None
        existing = await asyncio.to_thread(self.api.get_core, ref.namespace, "Secret", obj["metadata"]["name"])
        if existing is not None and not is_ours("Secret", existing, ref.uid):
            return ChildFailure("Secret", obj["metadata"]["name"], CONFLICT, not_owned_message(existing))
        return None  # ours already: the index has not caught up

    async def _observe(self, ref: builders.JobRef, spec: models.ExplorerJobSpec, rotation: str | None) -> Observed:
        observed = world.observe(ref.uid, self.view.children(ref.namespace, ref.name))
        observed = await self._existing_claim(ref, spec, observed)
        token = builders.secret_token(observed.secrets.get(builders.credentials_name(ref)), credentials.JOB_TOKEN)
        pod = observed.pods.get(f"{ref.name}-coordinator")
        report = await self._poll_coordinator(pod, spec.coordinator.api_port, token)
        return dataclasses.replace(observed, report=report, rotation=rotation)

    async def _existing_claim(self, ref: builders.JobRef, spec: models.ExplorerJobSpec, observed: Observed) -> Observed:
        """The user's claim (``storage.existingClaim``) carries no label of ours, so the index cannot see it: read it
        while the coordinator is not running on it yet, to say why it waits (never in a settled job)."""
        name = spec.storage.existing_claim if spec.storage else None
        coordinator = observed.pods.get(f"{ref.name}-coordinator")
        if name is None or ((coordinator or {}).get("status") or {}).get("phase") in ("Running", "Succeeded"):
            return observed
        claim = await asyncio.to_thread(self.api.get_core, ref.namespace, "PersistentVolumeClaim", name)
        return dataclasses.replace(observed, claims={**observed.claims, **({name: claim} if claim else {})})

    async def _poll_coordinator(
        self, pod: dict[str, Any] | None, port: int, token: str | None
    ) -> status_api.CoordinatorReport | None:
        """The running coordinator's report (asked with the job token from its Secret), or an ended one's."""
        status = (pod or {}).get("status") or {}
        ip = status.get("podIP")
        if status.get("phase") in ("Succeeded", "Failed"):
            return final_report(status)
        if status.get("phase") != "Running" or not ip or token is None:
            return None
        try:
            response = await self.http.get(f"http://{ip}:{port}/status", headers=credentials.bearer(token))
            response.raise_for_status()
            return status_api.CoordinatorReport.model_validate(response.json())
        except (httpx.HTTPError, ValueError, ValidationError) as err:
            log.debug("coordinator %s:%s did not report: %s", ip, port, err)
            return None

    async def _invalid(
        self, job: dict[str, Any], previous: models.ExplorerJobStatus, observed: dict[str, Any] | None, message: str
    ) -> None:
        """A spec that cannot work: Failed/InvalidSpec and one Warning event; never an exception loop."""
        now = _now()
        status = previous.model_copy(deep=True)
        status.phase = "Failed"
        status.observed_generation = job["metadata"].get("generation")
        gen = status.observed_generation
        was = next((c for c in previous.conditions if c.type == "Failed"), None)
        status.conditions = conditions.set_condition(
            status.conditions, "Failed", "True", "InvalidSpec", message, now, gen
        )
        status.conditions = conditions.set_condition(
            status.conditions, "Ready", "False", "InvalidSpec", message, now, gen
        )
        wire = status.to_wire()
        if wire != observed:
            await self._write_status(job, wire)
        if was is None or was.reason != "InvalidSpec" or was.message != message:
            await self._event(job, "Warning", "InvalidSpec", message, now)

    async def _event(self, job: dict[str, Any], type_: str, reason: str, message: str, now: datetime.datetime) -> None:
        metrics.EVENTS.labels(reason=reason).inc()
        stamp = now.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        try:
            await asyncio.to_thread(self.api.post_event, job, type_, reason, message, stamp)
        except Exception:  # an event is best effort; the status carries the same facts
            log.warning("could not post event %s for %s", reason, job["metadata"]["name"], exc_info=True)
