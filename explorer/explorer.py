"""The Explorer: the seed's explore → eval → sync timeline over the scheduler, with resumable state.

Each step takes ``batch_size`` tasks from the taskset (cycling through it), collects their experiences, commits them
to the sink and then records ``(step, cursor)``, both written durably in a worker thread (the event loop keeps
dispatching and serving the status and sync APIs); the next step is already queued while one is collected, except
across a sync boundary; a restarted coordinator resumes after the last committed step, so no step is lost or written
twice. A step whose wait expires is committed with the tasks that finished, its missing tasks named in the manifest
and counted in the status report, or (``explore.onStepTimeout: wait``) waited for. Evaluation runs every
``eval_interval`` steps as batch ``"{step}/{taskset}"``. Sync boundaries follow ``sync.interval``/``sync.offset``.
With a ``SyncCoordinator`` (the coordinator's weight-sync side) the style decides how far exploring may run ahead of
the trainer: ``fixed`` waits at every boundary for the trainer's next push, ``async`` lets it run ``maxPolicyLag``
boundaries ahead, ``trainer_driven`` never waits. Runners dispatch only to engines serving the job's version; one
that does not (restarted, or its apply failed) is brought to it from a peer engine as soon as a probe sees it. Each
experience records the policy version its step started on and every version applied while it ran. Committed steps
are served to trainers by ``experience_stream`` on the sync API; with ``experiences.maxUnconsumedSteps`` a step
starts only while the slowest consumer has fewer steps unacknowledged (steps in flight count; the report's
``waitingFor`` says when it holds), and after the last step the API stays up until every consumer has read to the
end (at most ``experiences.drainTimeoutSeconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from explorer import config as explorer_config
from explorer import credentials, eval_metrics, membership, sink, status_api, taskset, telemetry, workflow_runner
from explorer import scheduler as scheduler_mod
from explorer.experience import Experience
from explorer.experience_stream import ExperienceStream
from explorer.weight_sync import api, protocol
from explorer.weight_sync.rendezvous import SyncCoordinator
from explorer.workflows import Task

log = logging.getLogger(__name__)
STATE_FILE = "explorer-state.json"
FINAL_READ_GRACE_SECONDS = 5.0  # after the drain, how long the stream still answers a last read
SyncHook = Callable[[int], Awaitable[int | None]]
CATCH_UP_RETRY_SECONDS = 30.0  # after an engine failed to catch up from a peer, before it is tried again
TRAINER_TIMEOUT = "TrainerTimeout"  # the report's failure_reason: final, a restarted coordinator would only wait again


class TrainerTimeoutError(RuntimeError):
    """No push from the trainer within ``sync.trainerTimeoutSeconds`` at a boundary, with ``onTrainerTimeout: Fail``."""


@dataclasses.dataclass
class ExplorerState:
    step: int = 0
    cursor: int = 0
    # Pushes the job had seen when this explorer first started (pushes before the first step count as earlier
    # ones); with the steps committed since, it says how many pushes each later sync boundary waits for.
    sync_baseline: int | None = None


def _save_state(directory: Path, state: ExplorerState) -> None:
    sink.write_durably(directory / STATE_FILE, json.dumps(dataclasses.asdict(state)).encode())


def load_state(directory: Path) -> ExplorerState:
    try:
        return ExplorerState(**json.loads((directory / STATE_FILE).read_text()))
    except FileNotFoundError:
        return ExplorerState()


class Explorer:
    """Explores the taskset; ``report`` is what the status API serves."""

    def __init__(
        self,
        config: explorer_config.ExplorerConfig,
        sync_hook: SyncHook | None = None,
        sync: SyncCoordinator | None = None,
    ):
        self.config = config
        self.sync_hook = sync_hook
        self.sync = sync
        self._applied_versions: list[int] = []
        self.scheduler: scheduler_mod.Scheduler | None = None
        self._catch_up: asyncio.Task[None] | None = None
        self._catch_up_after = 0.0
        self._scaling = False
        if sync is not None:
            sync.on_version = self._on_version
        self.report = status_api.CoordinatorReport(total_steps=config.explore.total_steps)
        self.telemetry = telemetry.Telemetry()
        self.sink = sink.ExperienceSink(Path(config.experiences.path), config.experiences.format)
        self.stream = ExperienceStream(self.sink, config.experiences, config.explore.total_steps)
        if sync is not None:
            sync.experiences = self.stream  # the trainer reads them on the sync API
        self.policy_version: int | None = None
        self.eval_metrics: dict[str, dict[str, float]] = {}
        self.row_errors: list[taskset.RowError] = []
        self.on_step: Callable[[int, dict[str, float]], None] | None = None
        self._carried: dict[int, int] = {}  # over-rollout: batch -> taskset cursor, for batches with stragglers

    def need_sync(self, step: int) -> bool:
        sync = self.config.sync
        return step > sync.offset and (step - sync.offset) % sync.interval == 0

    def boundaries_until(self, step: int) -> int:
        """Sync boundaries among steps 1..``step``."""
        sync = self.config.sync
        return max(0, (step - sync.offset) // sync.interval) if step > sync.offset else 0

    def _sync_baseline(self, state: ExplorerState) -> int:
        """Pushes that count as given before step 1 (kept in the state; a state from before it was kept: assume the
        trainer had caught up with the boundaries passed)."""
        if state.sync_baseline is not None:
            return state.sync_baseline
        pushes = self.sync.syncs if self.sync is not None else 0
        return max(0, pushes - self.boundaries_until(state.step))

    def allowed_lag(self) -> int | None:
        """Sync boundaries exploring may run ahead of the trainer's pushes (None: never wait)."""
        if self.sync is None:
            return None
        style = self.config.sync.style
        if style == "fixed":
            return 0
        if style == "async":
            return self.config.sync.max_policy_lag or 0
        return None

    def current_report(self) -> status_api.CoordinatorReport:
        """The explorer's report with the sync group's figures merged in."""
        if self.sync is None:
            return self.report
        sync = self.sync
        return self.report.model_copy(update={
            "policy_version": sync.version, "engines_in_sync": sync.engines_in_sync,
            "last_sync_time": sync.last_sync_time, "last_sync_duration_seconds": sync.last_sync_duration,
            "last_sync_bytes": sync.last_sync_bytes,
        })  # fmt: skip

    def _batch(self, tasks: list[Task], cursor: int) -> list[Task]:
        size = self.config.explore.batch_size
        return [dataclasses.replace(tasks[(cursor + i) % len(tasks)], task_id=i) for i in range(size)]

    async def explore(self) -> str:
        """Run to ``total_steps`` (or resume there); returns a one-line summary."""
        if self.config.explore.over_rollout is not None and self.sync is not None and self.config.sync.style == "fixed":
            raise ValueError(
                "explore.overRollout needs sync.style trainer_driven or async (with fixed, a straggler "
                "committed later would be trained after the policy it was explored with changed)"
            )
        tasks, self.row_errors = taskset.load_taskset(self.config.taskset)
        state = self._resume_state()
        sched = await self._start_scheduler()
        evals = await self._start_evals(sched, state)
        self.report = self.report.model_copy(update={"phase": "Running", "step": state.step})
        written = 0
        if self.sync is not None:
            self.policy_version = self.sync.version
        lag = self.allowed_lag()
        # The sync coordinator counts pushes over the job's life (persisted with the versions), so a resumed run
        # waits for exactly the pushes the boundaries it already passed have not been given.
        boundaries = (state.sync_baseline or 0) + self.boundaries_until(state.step)
        marks: dict[int, tuple[int | None, int]] = {}  # step -> (version when scheduled, applied-log position)
        cursors: dict[int, int] = {}  # step -> taskset cursor of its batch
        self._carried = self._resume_stragglers(sched, tasks, state.step, marks)
        try:
            total, size = self.config.explore.total_steps, self.config.explore.batch_size
            submitted = state.step
            for step in range(state.step + 1, total + 1):
                # Keep the engines busy: the next step is queued behind this one unless the explorer must wait for
                # a sync between them (then its tokens would come from the old policy). An uncommitted step is
                # simply re-run on restart.
                waits = (self.sync_hook is not None or lag == 0) and self.need_sync(step)
                horizon = step if waits else min(step + 1, total)
                while submitted < horizon and await self._room(step, submitted):
                    submitted += 1
                    marks[submitted] = (self._served_version(), len(self._applied_versions))
                    cursors[submitted] = state.cursor + (submitted - step) * size
                    sched.schedule(self._batch(tasks, cursors[submitted]), batch_id=submitted)
                start_version, statuses, experiences, missing = await self._collect_step(
                    sched, step, step == total, marks, cursors
                )
                written += len(experiences)
                state = ExplorerState(step, state.cursor + size, state.sync_baseline)
                metrics = await self._commit(sched, state, experiences, statuses, missing, start_version, written)
                await self._evaluate(sched, step, evals)
                if self.need_sync(step):
                    boundaries += 1
                    await self._at_boundary(step, boundaries, lag)
                self.report = self.report.model_copy(update={"step": step, "policy_version": self.policy_version,
                                                             "message": json.dumps(metrics)[:500]})  # fmt: skip
                self.telemetry.committed(step, self.policy_version, None)  # the version the boundary brought
                if self.on_step:
                    self.on_step(step, metrics)
        except BaseException as err:
            self._report_failure(err)
            raise
        finally:
            await sched.stop()
        self.report = self.report.model_copy(update={"phase": "Succeeded"})
        return f"explored {self.config.explore.total_steps} steps; {written} experiences written this run"

    async def _commit(
        self, sched: scheduler_mod.Scheduler, state: ExplorerState, experiences: list[Experience],
        statuses: list[workflow_runner.Status], missing: list[int], start_version: int | None, written: int,
    ) -> dict[str, float]:  # fmt: skip
        """Commit step ``state.step`` (with the stragglers it leaves running), then save ``state``; the report
        follows. Returns the step's metrics."""
        step = state.step
        pending = {b: (cursor, sched.uncollected_task_ids(b)) for b, cursor in self._carried.items()}
        # Blocking writes with fsyncs: off the loop, which keeps dispatching and serving the APIs.
        await asyncio.to_thread(self.sink.commit, step, experiences, start_version, missing, pending)
        self.stream.notify()
        failed = sum(1 for s in statuses if not s.ok)
        step_metrics = sched.metrics.get(step, {})
        self.report = self.report.model_copy(update={
            "experiences": written, "failed_tasks": self.report.failed_tasks + failed,
            "missing_tasks": self.report.missing_tasks + len(missing),
            "carried_tasks": sum(len(ids) for _, ids in pending.values()),
            "experiences_per_second": step_metrics.get("experiences_per_second")})  # fmt: skip
        await asyncio.to_thread(_save_state, self.sink.directory, state)
        self.telemetry.committed(step, self.policy_version, step_metrics.get("experiences_per_second"))
        metrics = {**step_metrics, "failed_tasks": failed, "missing_tasks": len(missing)}
        if experiences:
            metrics["reward_mean"] = sum(e.reward for e in experiences) / len(experiences)
        return metrics

    async def _room(self, step: int, submitted: int) -> bool:
        """Back-pressure before step ``submitted + 1`` starts: the step due now waits for room; one that would run
        ahead never waits (the step in flight is collected, and can be consumed, first). Steps in flight count."""
        in_flight = submitted - step + 1  # scheduled, not yet committed
        if in_flight:
            return await self.stream.hold_reason(in_flight) is None
        await self.stream.wait_for_room(self._on_hold)
        return True

    def _on_hold(self, reason: str | None) -> None:
        update: dict[str, Any] = {"waiting_for": reason}
        if reason is not None:
            update["message"] = f"back-pressure: waiting for {reason}"
        self.report = self.report.model_copy(update=update)

    async def drain(self) -> None:
        """After the last step: wait until every consumer has read to the end (``experiences.drainTimeoutSeconds``)."""
        timeout = self.config.experiences.drain_timeout_seconds

        def waiting(reason: str) -> None:
            self.report = self.report.model_copy(update={"waiting_for": reason})

        left = await self.stream.drain(timeout, waiting)
        self.report = self.report.model_copy(update={"waiting_for": None})
        if left:
            log.warning("stopping after %.0f s of draining with experiences unconsumed: %s", timeout, left)
        elif self.config.experiences.consumers:
            # A consumer that acked the last batch may read once more: it gets a clean "exhausted" (410), not a
            # refused connection, if that read comes within this grace.
            await asyncio.sleep(FINAL_READ_GRACE_SECONDS)

    def _resume_state(self) -> ExplorerState:
        state = load_state(self.sink.directory)
        committed = self.sink.committed_steps()
        if committed and max(committed) > state.step:
            # Committed but the state write did not land: the step is done; advance past it.
            behind = max(committed) - state.step
            state = ExplorerState(
                max(committed), state.cursor + behind * self.config.explore.batch_size, state.sync_baseline
            )
        return dataclasses.replace(state, sync_baseline=self._sync_baseline(state))

    def _stamp_versions(self, experiences: list[Experience], start_version: int | None, mark: int) -> int | None:
        """Record on each experience the version its step started on and every version applied while it ran; an
        experience from an engine at another version (``follow_served_versions``: when none was at the job's) gets
        the version that engine served (None: the base weights)."""
        during = [start_version] if start_version is not None else []
        during += [v for v in self._applied_versions[mark:] if v not in during]
        for exp in experiences:
            exp.policy_version = start_version
            exp.policy_versions = list(during)
            served = exp.info.get("engine_version", str(start_version))
            if served != str(start_version):  # no engine was at the version: say what this one served
                exp.policy_version = int(served) if isinstance(served, str) and served.isdigit() else None
                exp.policy_versions = [exp.policy_version] if exp.policy_version is not None else []
        return start_version

    def _resume_stragglers(
        self, sched: scheduler_mod.Scheduler, tasks: list[Task], step: int, marks: dict[int, tuple[int | None, int]]
    ) -> dict[int, int]:
        """Run again the tasks the last committed step left running (over-rollout): they were never committed, and
        the next step commits them. Returns batch -> its taskset cursor."""
        carried: dict[int, int] = {}
        for batch, (cursor, ids) in sorted(self.sink.pending_tasks(step).items()):
            wanted = set(ids)
            sched.schedule([t for t in self._batch(tasks, cursor) if t.task_id in wanted], batch_id=batch)
            marks[batch] = (self._served_version(), len(self._applied_versions))
            carried[batch] = cursor
            log.info("resuming %d tasks of step %d that were still running when step %d was committed",
                     len(wanted), batch, step)  # fmt: skip
        return carried

    async def _collect_step(
        self, sched: scheduler_mod.Scheduler, step: int, last: bool, marks: dict[int, tuple[int | None, int]],
        cursors: dict[int, int],
    ) -> tuple[int | None, list[workflow_runner.Status], list[Experience], list[int]]:  # fmt: skip
        """What step ``step`` commits: its batch's results, or with ``explore.overRollout`` its first ``minTasks``
        (and those done within ``waitSeconds`` more), plus the stragglers of earlier steps that finished since (every
        one at the last step, which also waits for its own). Each experience is stamped with its own batch's
        versions. Returns the step's start version, statuses, experiences and missing task ids."""
        over = None if last else self.config.explore.over_rollout
        statuses, experiences, missing = await self._collect(sched, step, over.min_tasks if over else None)
        if over is not None and over.wait_seconds and sched.has_step(step):
            more_statuses, more_experiences = await sched.get_results(step, timeout=over.wait_seconds,
                                                                      clear_timeout_tasks=False)  # fmt: skip
            statuses, experiences = statuses + more_statuses, experiences + more_experiences
        start_version = self._stamp_versions(experiences, *marks[step])
        if sched.uncollected_task_ids(step):
            self._carried[step] = cursors[step]
        for batch in sorted(b for b in self._carried if b != step):
            # Each attempt is bounded by taskTimeoutSeconds, so waiting without a limit ends: ok or failed.
            late_statuses, late = await sched.get_results(batch, timeout=math.inf if last else 0,
                                                          clear_timeout_tasks=False)  # fmt: skip
            self._stamp_versions(late, *marks[batch])
            statuses, experiences = statuses + late_statuses, experiences + late
            if not sched.uncollected_task_ids(batch):
                del self._carried[batch]
        for batch in [b for b in marks if b <= step and b not in self._carried]:
            del marks[batch]
        return start_version, statuses, experiences, missing

    async def _collect(
        self, sched: scheduler_mod.Scheduler, batch_id: scheduler_mod.BatchId, min_num: int | None = None
    ) -> tuple[list[workflow_runner.Status], list[Experience], list[int]]:
        """A batch's results (``min_num``: the first that many) and the ids of the tasks it goes without: when its
        wait expires, either those that finished (``explore.onStepTimeout: commit``) or, after a warning, every one
        (``wait``)."""
        waits = self.config.explore.on_step_timeout == "wait"
        statuses, experiences = await sched.get_results(batch_id, min_num=min_num, clear_timeout_tasks=not waits)
        if waits and sched.has_step(batch_id) and (min_num is None or len(statuses) < min_num):
            log.warning("batch %s: tasks still running when its wait expired; waiting for them (onStepTimeout: wait)",
                        batch_id)  # fmt: skip
            self.report = self.report.model_copy(update={"message": f"batch {batch_id}: waiting past its timeout"})
            rest = None if min_num is None else min_num - len(statuses)
            more_statuses, more_experiences = await sched.get_results(batch_id, min_num=rest, timeout=math.inf)
            statuses, experiences = statuses + more_statuses, experiences + more_experiences
        missing = sorted(sched.cleared.pop(batch_id, []))
        if missing:
            log.warning("batch %s: committed without %d tasks whose wait expired: task ids %s",
                        batch_id, len(missing), missing)  # fmt: skip
        return statuses, experiences, missing

    async def _start_evals(
        self, sched: scheduler_mod.Scheduler, state: ExplorerState
    ) -> list[tuple[explorer_config.EvalTasksetSpec, list[Task]]]:
        """The eval sets' tasks; evaluated once before the first step with ``evalOnStart`` (not on a resume)."""
        evals = [(t, taskset.load_taskset(t, is_eval=True)[0]) for t in self.config.explore.eval_tasksets]
        if self.config.explore.eval_on_start and state.step == 0:
            await self._evaluate(sched, 0, evals, due=True)
        return evals

    async def _evaluate(
        self, sched: scheduler_mod.Scheduler, step: int,
        evals: list[tuple[explorer_config.EvalTasksetSpec, list[Task]]], due: bool = False,
    ) -> None:  # fmt: skip
        """Every ``evalInterval`` steps (or ``due``): each eval set's tasks ``repeatTimes`` times; its figures
        (``eval_metrics``) go to the report (latest per set), the manifest (every step) and the log."""
        interval = self.config.explore.eval_interval
        if not due and (not interval or step % interval):
            return
        for spec, tasks in evals:
            batch_id = f"{step}/{spec.name}"
            sched.schedule(tasks, batch_id=batch_id, repeat_times=spec.repeat_times)
            _, experiences, missing = await self._collect(sched, batch_id)
            figures = eval_metrics.summarize(experiences, spec.repeat_times, spec.pass_threshold, missing)
            self.eval_metrics[batch_id] = figures
            self.telemetry.evaluated(spec.name, figures)
            await asyncio.to_thread(self.sink.record_eval, spec.name, step, figures)
            latest = {**self.report.eval, spec.name: status_api.EvalResult(step=step, metrics=figures)}
            self.report = self.report.model_copy(update={"eval": latest})
            log.info("eval %s after step %d: %s", spec.name, step, json.dumps(figures))

    async def _at_boundary(self, step: int, boundaries: int, lag: int | None) -> None:
        """A sync boundary: hand over to the hook, or wait until the trainer is at most ``lag`` pushes behind."""
        if self.sync_hook is not None:
            self.policy_version = await self.sync_hook(step)
        elif step == self.config.explore.total_steps:
            return  # nothing left to explore on the new weights: the job is done without waiting
        elif self.sync is not None and lag is not None and self.sync.syncs < boundaries - lag:
            self.report = self.report.model_copy(
                update={"message": f"step {step} done; waiting for the trainer's push #{boundaries - lag}"}
            )
            await self._wait_for_trainer(self.sync, step, boundaries - lag)

    def _report_failure(self, err: BaseException) -> None:
        final = TRAINER_TIMEOUT if isinstance(err, TrainerTimeoutError) else None
        message = str(err) if final else repr(err)
        self.report = self.report.model_copy(update={"phase": "Failed", "message": message[:500],
                                                     "failure_reason": final})  # fmt: skip

    async def _wait_for_trainer(self, sync: SyncCoordinator, step: int, pushes: int) -> None:
        """Wait for the job's push number ``pushes``; past ``sync.trainerTimeoutSeconds`` report the trainer overdue
        and keep waiting or fail, as ``sync.onTrainerTimeout`` says."""
        spec = self.config.sync
        waiting = asyncio.ensure_future(sync.wait_for_syncs(pushes))
        if spec.trainer_timeout_seconds is None:
            await waiting
            return
        try:
            await asyncio.wait_for(asyncio.shield(waiting), spec.trainer_timeout_seconds)
            return
        except TimeoutError:
            pass
        overdue = (f"no push from the trainer for {spec.trainer_timeout_seconds:g}s (sync.trainerTimeoutSeconds): "
                   f"step {step} is done and waits for push #{pushes}")  # fmt: skip
        log.warning("%s", overdue)
        if spec.on_trainer_timeout == "Fail":
            waiting.cancel()
            raise TrainerTimeoutError(overdue)
        self.report = self.report.model_copy(update={"trainer_overdue": True, "waiting_for": overdue,
                                                     "message": overdue})  # fmt: skip
        await waiting
        self.report = self.report.model_copy(update={"trainer_overdue": False, "waiting_for": None})

    def _served_version(self) -> int | None:
        return self.sync.version if self.sync is not None else self.policy_version

    async def _start_scheduler(self) -> scheduler_mod.Scheduler:
        sched = scheduler_mod.Scheduler(self.config, self.config.rollout, self.config.auxiliary,
                                        telemetry=self.telemetry)  # fmt: skip
        await sched.start()
        self.scheduler = sched
        if self.sync is not None:
            self.follow_served_versions(self.sync.engine_versions)
        return sched

    def _on_version(self, version: int) -> None:
        self._applied_versions.append(version)
        if self.sync is not None:
            self.follow_served_versions(self.sync.engine_versions)

    def follow_served_versions(self, served: Sequence[str | None]) -> list[int]:
        """Dispatch only to engines serving the job's policy version (a restarted engine serves the base weights;
        one that failed to apply a push, the previous version); returns the engines left out. Before the first
        push, and when no engine is at the version, every engine serves (``EngineLoad.acquire``)."""
        load = self.scheduler.engine_load if self.scheduler is not None else None
        current = self.sync.version if self.sync is not None else None
        if load is None or current is None or len(served) != len(load.serving):
            return []
        serving = [version == str(current) for version in served]
        left_out = [i for i, ok in enumerate(serving) if not ok]
        if serving != load.serving:
            log.warning("engines at policy version %s: %s; left out of the rotation until they serve it: %s",
                        current, [i for i, ok in enumerate(serving) if ok], left_out or "none")  # fmt: skip
        load.set_serving(serving, served)
        return left_out

    def version_mark(self) -> tuple[int, bool]:
        """Changes so far (pushes, catch-ups, scales) and whether one is under way: a probe taken across a change
        must not decide the rotation."""
        if self.sync is None:
            return (0, self._scaling)
        return (self.sync.changes, self.sync.pushing or self._scaling)

    def observe_engines(
        self, engines: list[status_api.EngineState], mark: tuple[int, bool]
    ) -> list[status_api.EngineState]:
        """Probed engines (``probe_engines``, taken after ``version_mark`` gave ``mark``): the versions they serve
        decide the rotation (an engine that restarted comes back on the base weights), each marked in or out."""
        sync = self.sync
        load = self.scheduler.engine_load if self.scheduler is not None else None
        if sync is None or mark[1] or self.version_mark() != mark or len(engines) != len(sync.engine_versions):
            return engines
        if load is not None and len(load.serving) != len(engines):  # mid-scale: the parts disagree for a moment
            return engines
        sync.engine_versions = [e.policy_version if e.healthy else None for e in engines]
        left_out = set(self.follow_served_versions(sync.engine_versions))
        self._start_catch_up(sync, [e.index for e in engines if e.healthy and e.index in left_out])
        return [e.model_copy(update={"in_rotation": e.index not in left_out}) for e in engines]

    async def set_rollout_engines(self, endpoints: list[explorer_config.EngineEndpoint]) -> bool:
        """Follow a scale of the rollout group (``membership``); returns whether anything changed.

        The sync coordinator takes the new engines between pushes, the runners' pools and the load picture follow,
        and added engines are out of the rotation until a probe finds them at the job's version (the probe also
        starts their catch-up from a peer). Before the first push every engine serves, added ones too. Sub-tasks in
        flight on a removed engine fail over to another one or are retried: none is lost, none counted twice."""
        if [e.to_wire() for e in endpoints] == [e.to_wire() for e in self.config.rollout.engines]:
            return False
        if not endpoints:
            raise ValueError("a rollout group needs at least one engine")
        was = len(self.config.rollout.engines)
        group = self.config.rollout.model_copy(update={"engines": list(endpoints)})
        self._scaling = True  # until every part has the new engines, a probe says nothing about the rotation
        try:
            self.config.rollout = group
            if self.sync is not None:
                await self.sync.set_engines(list(endpoints))
            if self.scheduler is not None:
                serving = self.sync is None or self.sync.version is None
                await self.scheduler.set_rollout_engines(group, serving)
            if self.sync is not None:
                self.follow_served_versions(self.sync.engine_versions)
        finally:
            self._scaling = False
        log.warning("the rollout group was scaled from %d to %d engines", was, len(endpoints))
        return True

    def _start_catch_up(self, sync: SyncCoordinator, strays: list[int]) -> None:
        """Have the coordinator bring healthy engines that are out of the rotation to the job's version from a peer
        (``SyncCoordinator.catch_up``), one catch-up at a time; a failed one is tried again after a pause."""
        running = self._catch_up is not None and not self._catch_up.done()
        if running or time.monotonic() < self._catch_up_after or not set(strays) & set(sync.catch_up_candidates()):
            return
        self._catch_up = asyncio.get_running_loop().create_task(self._run_catch_up(sync, strays))

    async def _run_catch_up(self, sync: SyncCoordinator, strays: list[int]) -> None:
        caught_up = await sync.catch_up(strays)
        if len(caught_up) < len(strays):
            self._catch_up_after = time.monotonic() + CATCH_UP_RETRY_SECONDS
        self.follow_served_versions(sync.engine_versions)

    def _need_sync_coordinator(self) -> SyncCoordinator:
        if self.sync is None:
            raise RuntimeError("this explorer has no weight-sync coordinator (run it as `python -m explorer run`)")
        return self.sync

    async def setup_weight_sync_group(
        self,
        master_address: str | None = None,
        master_port: int | None = None,
        state_dict_meta: list[Any] | None = None,
    ) -> protocol.GroupInfo:
        """Have every engine join a new sync group for ``state_dict_meta`` ((name, dtype, shape) or TensorMeta).

        Deliberate difference from the seed: a group forms over the coordinator's authenticated API (``formation_store``
        for gloo, a trainer-minted unique id for NCCL), never over a TCPStore that anyone reaching its port could
        write, so there is no master port to choose: ``master_address`` and ``master_port`` must be left unset.
        """
        sync = self._need_sync_coordinator()
        if master_address is not None or master_port is not None:
            raise ValueError("groups form over the sync API (no TCPStore): leave master_address and master_port unset")
        metas = [
            m if isinstance(m, protocol.TensorMeta)
            else protocol.TensorMeta(name=m[0], dtype=str(m[1]).removeprefix("torch."), shape=list(m[2]))
            for m in state_dict_meta or []
        ]  # fmt: skip
        return await sync.open_group(protocol.GroupRequest(tensors=metas))

    async def get_weight(self, name: str) -> Any:
        """The tensor (HF name) that engine 0 serves now."""
        return await self._need_sync_coordinator().get_weight(name)


async def probe_engines(
    config: explorer_config.ExplorerConfig, http: httpx.AsyncClient
) -> list[status_api.EngineState]:
    """``/health`` and ``/weight_info`` of every rollout engine (a missing dev-mode route leaves the version unset)."""

    async def one(endpoint: explorer_config.EngineEndpoint) -> status_api.EngineState:
        try:
            healthy = (await http.get(f"{endpoint.url}/health")).status_code == 200
        except httpx.HTTPError:
            return status_api.EngineState(index=endpoint.index, url=endpoint.url, healthy=False)
        version = None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            response = await http.get(f"{endpoint.url}/weight_info")
            if response.status_code == 200:
                version = response.json().get("weight_version")
        return status_api.EngineState(index=endpoint.index, url=endpoint.url, healthy=healthy, policy_version=version)

    return list(await asyncio.gather(*(one(e) for e in config.rollout.engines)))


def alive_ray_nodes() -> int | None:
    import ray

    if not ray.is_initialized():
        return None
    return sum(1 for node in ray.nodes() if node.get("Alive"))


async def wait_for_engines(explorer: Explorer, period: float = 2.0) -> None:
    """Until every rollout engine answers ``/health``: a coordinator pod starts in seconds, its engines load models
    for minutes, and tasks sent meanwhile fail and commit steps without experiences. The operator's startup
    deadline bounds the wait; the report says which engines it waits for."""
    async with httpx.AsyncClient(timeout=2.0, headers=credentials.job_headers()) as http:
        while down := [e.index for e in await probe_engines(explorer.config, http) if not e.healthy]:
            reason = f"engines {', '.join(map(str, down))} to answer /health"
            if explorer.report.waiting_for != reason:
                log.warning("waiting for %s before the first step", reason)
                explorer.report = explorer.report.model_copy(update={"waiting_for": reason,
                                                                     "message": f"waiting for {reason}"})  # fmt: skip
            await asyncio.sleep(period)
    explorer.report = explorer.report.model_copy(update={"waiting_for": None})


async def serve_and_explore(
    explorer: Explorer,
    host: str,
    port: int,
    probe_seconds: float = 5.0,
    experience_port: int | None = None,
    engines_first: bool = False,
    config_path: Path | None = None,
) -> str:
    """Explore while the status API publishes progress and the sync API takes pushes and serves experiences (without
    a sync coordinator, ``experience_port`` serves the experiences alone); then drain the experience stream.
    ``engines_first``: start exploring only once every rollout engine is healthy (``wait_for_engines``);
    ``config_path``: follow the rollout engines it names as they change (``membership``)."""
    server = status_api.StatusServer(host, port, explorer.report, metrics=explorer.telemetry.exposition)

    async def publish() -> None:
        probed: dict[str, Any] = {}
        last_probe = -probe_seconds
        async with httpx.AsyncClient(timeout=2.0, headers=credentials.job_headers()) as http:
            while True:
                if asyncio.get_running_loop().time() - last_probe >= probe_seconds:
                    last_probe = asyncio.get_running_loop().time()
                    mark = explorer.version_mark()  # before the probe: a push after it voids what the probe saw
                    engines = explorer.observe_engines(await probe_engines(explorer.config, http), mark)
                    probed = {"engines": engines, "ray_nodes": await asyncio.to_thread(alive_ray_nodes)}
                server.report = explorer.current_report().model_copy(update=probed)
                await asyncio.sleep(0.2)

    await server.start()
    experiences: Any = None
    if explorer.sync is not None:
        await explorer.sync.start()
    elif experience_port is not None:
        experiences = await status_api.serve_app(api.build_app(None, lambda: explorer.stream), host, experience_port)
    publisher = asyncio.create_task(publish())
    follower = asyncio.create_task(membership.follow_config(explorer, config_path)) if config_path else None
    try:
        if engines_first:
            await wait_for_engines(explorer)
        summary = await explorer.explore()
        if explorer.sync is not None or experiences is not None:
            await explorer.drain()
        return summary
    finally:
        server.report = explorer.current_report()
        for task in (publisher, follower):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if explorer.sync is not None:
            await explorer.sync.stop()
        if experiences is not None:
            await experiences.cleanup()
        await server.stop()
