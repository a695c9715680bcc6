"""The event-driven rollout scheduler (seed API: TaskWrapper, RunnerWrapper, Scheduler).

No polling: ``schedule`` pushes sub-tasks onto a priority heap (batch-id order, retries first) and wakes the
dispatcher, which hands each to the next idle runner; completions wake ``get_results`` waiters directly. Each attempt
gets exactly ``task_timeout_seconds`` (a first attempt less with ``dynamicTimeout``: ``attempt_timeouts``); a timed-out
attempt is cancelled on the runner (its engine request aborted)
and retried on another runner; a crashed runner actor is replaced and its sub-task retried; any other runner error
(a failed replacement, a lost object) fails the attempt, which is retried or recorded: nothing is dropped.
``get_results(min_num=k)`` waits for ``k`` results not yet collected and returns at most ``k``; a batch cleared at a
timeout forgets its unfinished tasks (their ids go to ``cleared``), keeps its finished results collectable, and its
id can be scheduled again. The scheduler also chooses each sub-task's rollout engine (``engine_load``: least
outstanding across the whole job, engines a runner saw fail avoided for a while) and passes the choice to the runner.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from explorer import config as explorer_config
from explorer import engine_load
from explorer import telemetry as telemetry_mod
from explorer.attempt_timeouts import AttemptTimeouts
from explorer.experience import Experience
from explorer.workflow_runner import ModelRef, Status, WorkflowRunner, mean_over_runs
from explorer.workflows import Task

log = logging.getLogger(__name__)
BatchId = int | str


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:2000]


def batch_key(batch_id: BatchId) -> tuple[float, int, str]:
    """``2 < "2/eval" < 3 < "abc"``: train steps, then that step's eval batches, then anything else."""
    if isinstance(batch_id, int):
        return (batch_id, 0, "")
    head, _, rest = batch_id.partition("/")
    if head.isdigit():
        return (int(head), 0 if not rest else 1, rest)
    return (math.inf, 2, batch_id)


@dataclasses.dataclass
class TaskWrapper:
    """A (sub-)task as scheduled: ``repeat_times`` runs starting at run id ``run_id_base``."""

    task: Task
    batch_id: BatchId
    run_id_base: int = 0
    repeat_times: int = 1
    attempts: int = 0
    index: int = 0  # position of the task in its ``schedule`` call
    engine_order: tuple[int, ...] = ()  # this attempt's rollout engines to try, first to last (set at dispatch)


class RunnerBackend(Protocol):
    """Where a runner executes: a Ray actor in production; in-process only for benchmarks."""

    async def run(self, task: TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]: ...

    async def restart(self) -> None: ...

    async def close(self) -> None: ...


class ActorHost:
    """One ``WorkflowRunner`` Ray actor process; several runner slots may share it (its calls are async)."""

    def __init__(self, host_id: int, cfg: explorer_config.ExplorerConfig, model: ModelRef, aux: Sequence[ModelRef]):
        import ray

        self._ray = ray
        self.host_id = host_id
        self._args = (cfg, model, list(aux), host_id)
        self._cls = ray.remote(num_cpus=0, max_restarts=0)(WorkflowRunner)
        self.actor = self._cls.remote(*self._args)
        self.generation = 0
        self._lock = asyncio.Lock()

    async def ready(self) -> None:
        await self.actor.ping.remote()

    async def restart(self, seen_generation: int) -> None:
        """Replace the actor once, however many of its slots saw it die."""
        async with self._lock:
            if self.generation != seen_generation:
                return
            self._ray.kill(self.actor, no_restart=True)
            self.actor = self._cls.remote(*self._args)
            await self.ready()
            self.generation += 1

    async def set_rollout(self, group: explorer_config.EngineGroupConfig) -> None:
        """The rollout group after a scale: the live actor follows it, and so does any replacement made later."""
        cfg, _, aux, host_id = self._args
        self._args = (cfg, group, aux, host_id)
        await self.actor.set_rollout_engines.remote([e.url for e in group.engines])

    async def close(self) -> None:
        self._ray.kill(self.actor, no_restart=True)


class RayRunner:
    """A runner slot on an ``ActorHost``: cancels timed-out calls, replaces the actor when it dies."""

    def __init__(self, host: ActorHost):
        self.host = host

    async def run(self, task: TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]:
        ray = self.host._ray
        generation = self.host.generation
        ref = self.host.actor.run_task.remote(task.task, task.repeat_times, task.run_id_base, task.engine_order)
        try:
            result: tuple[Status, list[Experience]] = await asyncio.wait_for(ref, timeout)
            return result
        except TimeoutError:
            ray.cancel(ref)  # raises CancelledError in the actor: the engine request is aborted
            return Status(False, {}, f"attempt timed out after {timeout:g}s"), []
        except asyncio.CancelledError:
            ray.cancel(ref)
            raise
        except ray.exceptions.RayActorError as err:
            died = f"runner process {self.host.host_id} died ({type(err).__name__})"
            try:  # bounded like an attempt: a replacement that never becomes ready must not hold the sub-task
                await asyncio.wait_for(self.host.restart(generation), timeout)
            except Exception as failed:  # the next attempt that finds it dead tries again
                return Status(False, {}, f"{died} and could not be replaced: {_describe(failed)}"), []
            return Status(False, {}, f"{died} and was replaced"), []

    async def restart(self) -> None:
        await self.host.restart(self.host.generation)

    async def close(self) -> None:
        return None  # the host is closed once by the scheduler


class RunnerWrapper:
    """Seed API: one runner and its retry loop (the Scheduler itself retries on *another* runner)."""

    def __init__(
        self,
        runner_id: int,
        rollout_model: ModelRef,
        auxiliary_models: Sequence[ModelRef] | None,
        config: explorer_config.ExplorerConfig,
        backend: RunnerBackend | None = None,
    ):
        self.runner_id = runner_id
        self.config = config
        self.backend = backend or RayRunner(ActorHost(runner_id, config, rollout_model, auxiliary_models or []))

    async def run_once(self, task: TaskWrapper, timeout: float | None = None) -> tuple[Status, list[Experience]]:
        """One attempt of at most ``timeout`` seconds (default ``taskTimeoutSeconds``); never raises but
        ``CancelledError``: every runner error is the attempt's failed outcome."""
        try:
            limit = self.config.scheduler.task_timeout_seconds if timeout is None else timeout
            status, experiences = await self.backend.run(task, limit)
        except Exception as err:  # e.g. ObjectLostError, a RayTaskError: retried or recorded, never dropped
            log.warning("runner %s failed a sub-task of batch %s: %s", self.runner_id, task.batch_id, _describe(err))
            return Status(False, {}, f"runner {self.runner_id} failed: {_describe(err)}"), []
        return status, list(experiences)

    async def run_with_retry(self, task: TaskWrapper) -> tuple[Status, list[Experience], int]:
        status, experiences = Status(False, {}, "not run"), list[Experience]()
        for _ in range(self.config.scheduler.max_retry_times + 1):
            status, experiences = await self.run_once(task)
            if status.ok:
                break
        return status, experiences, self.runner_id


@dataclasses.dataclass
class _TaskResult:
    task_id: int
    subtasks: int
    runs: list[tuple[Status, int]] = dataclasses.field(default_factory=list)  # (final status, runs) per sub-task
    experiences: list[Experience] = dataclasses.field(default_factory=list)
    started: float = dataclasses.field(default_factory=time.monotonic)
    finished: float | None = None

    def combined(self) -> Status:
        """Ok when every sub-task is; each metric a mean over runs, however the task's repeats were split."""
        statuses = [s for s, _ in self.runs]
        ok = all(s.ok for s in statuses)
        errors = [s.message for s in statuses if not s.ok and s.message]
        succeeded = f"{sum(s.ok for s in statuses)}/{len(statuses)} sub-tasks succeeded"
        message = None if ok else f"{succeeded}. First error: {errors[0] if errors else '?'}"
        served_by = tuple(dict.fromkeys(e for s in statuses for e in s.served_by))
        failed = tuple(sorted({e for s in statuses for e in s.failed_engines}))
        return Status(ok, mean_over_runs([(s.metric, n) for s, n in self.runs]), message, failed, served_by)


@dataclasses.dataclass
class _Batch:
    batch_id: BatchId
    tasks: dict[int, _TaskResult] = dataclasses.field(default_factory=dict)
    done: list[int] = dataclasses.field(default_factory=list)  # indices of finished tasks, in finishing order
    collected: int = 0  # how many of ``done`` get_results has returned
    collected_experiences: int = 0
    next_index: int = 0
    running: set[asyncio.Task[None]] = dataclasses.field(default_factory=set)
    changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    cancelled: bool = False
    retries: int = 0
    failures: int = 0

    def uncollected(self) -> int:
        return len(self.done) - self.collected


class Scheduler:
    """Dispatches tasks to runners; ``get_results`` collects them per batch."""

    def __init__(
        self,
        config: explorer_config.ExplorerConfig,
        rollout_model: ModelRef,
        auxiliary_models: Sequence[ModelRef] | None = None,
        runner_count: int | None = None,
        backend_factory: Callable[[int], RunnerBackend] | None = None,
        telemetry: telemetry_mod.Telemetry | None = None,
    ):
        self.config = config
        self.telemetry = telemetry or telemetry_mod.Telemetry()  # Prometheus figures (the status port's /metrics)
        self.attempt_timeouts = AttemptTimeouts(config.scheduler.task_timeout_seconds, config.scheduler.dynamic_timeout)
        engines = max(1, len(config.rollout.engines))
        count = runner_count or engines * config.scheduler.runners_per_engine
        processes = min(count, config.scheduler.runner_processes or count)
        self.hosts: list[ActorHost] = []
        self._auxiliary = list(auxiliary_models or [])
        if backend_factory is None:
            self.hosts = [ActorHost(i, config, rollout_model, self._auxiliary) for i in range(processes)]
        self.runners = [
            RunnerWrapper(i, rollout_model, auxiliary_models, config,
                          backend_factory(i) if backend_factory else RayRunner(self.hosts[i % processes]))
            for i in range(count)
        ]  # fmt: skip
        self._idle: asyncio.Queue[RunnerWrapper] = asyncio.Queue()
        self._retiring: set[RunnerWrapper] = set()  # removed by a scale-down, retired once idle
        self._pending: list[tuple[tuple[float, int, str], int, int, TaskWrapper, _Batch]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._batches: dict[BatchId, _Batch] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        self.metrics: dict[BatchId, dict[str, float]] = {}
        self.cleared: dict[BatchId, list[int]] = {}  # task ids a timeout cleared before they finished, per batch
        group = rollout_model if isinstance(rollout_model, explorer_config.EngineGroupConfig) else None
        self.engine_load = engine_load.EngineLoad(len(group.engines)) if group and group.engines else None

    async def set_rollout_engines(self, group: explorer_config.EngineGroupConfig, serving: bool) -> None:
        """Follow a scale of the rollout group (engine indices are stable: a scale adds or removes the last ones).

        Every runner process gets the new engines; the load picture is resized, added engines ``serving`` or out of
        the rotation until the explorer finds them at the job's version; runners follow at ``runnersPerEngine`` per
        engine: added ones start at once, removed ones finish their sub-task first (``_retire``), and a runner
        process none of the remaining runners uses is stopped.
        """
        if not group.engines:
            raise ValueError("a rollout group needs at least one engine")
        await asyncio.gather(*(host.set_rollout(group) for host in self.hosts))
        if self.engine_load is not None:
            self.engine_load.resize(len(group.engines), serving)
        want = len(group.engines) * self.config.scheduler.runners_per_engine
        if len(self.runners) > want:
            self._retiring.update(self.runners[want:])
            self.runners = self.runners[:want]
            await self._retire_idle()
        if not self.hosts or len(self.runners) >= want:
            return
        limit = self.config.scheduler.runner_processes or want
        while len(self.hosts) < min(want, limit):
            host = ActorHost(len(self.hosts), self.config, group, self._auxiliary)
            await host.ready()
            self.hosts.append(host)
        for runner_id in range(len(self.runners), want):
            runner = RunnerWrapper(runner_id, group, self._auxiliary, self.config,
                                   RayRunner(self.hosts[runner_id % len(self.hosts)]))  # fmt: skip
            self.runners.append(runner)
            self._idle.put_nowait(runner)

    async def _retire_idle(self) -> None:
        """Retire the idle runners a scale-down removed (busy ones are retired when their sub-task ends)."""
        idle = [self._idle.get_nowait() for _ in range(self._idle.qsize())]
        for runner in idle:
            if runner in self._retiring:
                await self._retire(runner)
            else:
                self._idle.put_nowait(runner)

    async def _retire(self, runner: RunnerWrapper) -> None:
        """Drop a removed runner; stop its process when no remaining or busy runner shares it."""
        self._retiring.discard(runner)
        backend = runner.backend
        if not isinstance(backend, RayRunner):
            await backend.close()
            return
        in_use = {id(b.host) for r in [*self.runners, *self._retiring] if isinstance(b := r.backend, RayRunner)}
        if backend.host in self.hosts and id(backend.host) not in in_use:
            self.hosts.remove(backend.host)
            await backend.host.close()
            log.info("stopped runner process %d after a scale-down", backend.host.host_id)

    async def start(self) -> None:
        await asyncio.gather(*(host.ready() for host in self.hosts))
        for runner in self.runners:
            self._idle.put_nowait(runner)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="scheduler-dispatch")

    async def stop(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        for batch in list(self._batches.values()):
            self._cancel(batch)
        self._batches.clear()
        await asyncio.gather(*(r.backend.close() for r in self.runners), return_exceptions=True)
        await asyncio.gather(*(host.close() for host in self.hosts), return_exceptions=True)

    # ---- scheduling ------------------------------------------------------------------------------------
    def _split(self, task: Task, batch_id: BatchId, index: int, repeat_times: int | None) -> list[TaskWrapper]:
        repeat = repeat_times or (self.config.explore.repeat_times if not task.is_eval else 1)
        chunk = self.config.scheduler.max_repeat_times_per_runner or repeat
        return [
            TaskWrapper(task, batch_id, run_id_base=base, repeat_times=min(chunk, repeat - base), index=index)
            for base in range(0, repeat, chunk)
        ]

    def schedule(self, tasks: Sequence[Task], batch_id: BatchId, repeat_times: int | None = None) -> None:
        """Queue ``tasks`` as batch ``batch_id`` (an int, or a string starting with an int); never blocks.
        ``repeat_times``: runs per task (default ``explore.repeatTimes``, one for eval tasks)."""
        batch = self._batches.setdefault(batch_id, _Batch(batch_id))
        for task in tasks:
            index, batch.next_index = batch.next_index, batch.next_index + 1
            subtasks = self._split(task, batch_id, index, repeat_times)
            batch.tasks[index] = _TaskResult(task.task_id, subtasks=len(subtasks))
            for sub in subtasks:
                self._push(sub, batch, retry=False)
        self._wake.set()

    def _push(self, sub: TaskWrapper, batch: _Batch, retry: bool) -> None:
        heapq.heappush(self._pending, (batch_key(sub.batch_id), 0 if retry else 1, next(self._seq), sub, batch))

    async def _dispatch(self) -> None:
        while True:
            runner = await self._idle.get()
            if runner in self._retiring:
                await self._retire(runner)
                continue
            while not self._pending:
                self._wake.clear()
                await self._wake.wait()
            if runner in self._retiring:  # a scale-down came while it waited for work
                await self._retire(runner)
                continue
            *_, sub, batch = heapq.heappop(self._pending)
            if batch.cancelled:
                self._idle.put_nowait(runner)
                continue
            job = asyncio.create_task(self._run(runner, sub, batch))
            batch.running.add(job)
            job.add_done_callback(batch.running.discard)

    async def _run(self, runner: RunnerWrapper, sub: TaskWrapper, batch: _Batch) -> None:
        versions = None
        if self.engine_load is not None:  # here, not in _dispatch: a job cancelled before it starts holds nothing
            sub.engine_order = self.engine_load.acquire(time.monotonic())
            versions = self.engine_load.versions  # replaced, never mutated: this is the picture at dispatch
        kind, _ = telemetry_mod.batch_kind(sub.batch_id)
        limit = self.attempt_timeouts.timeout(kind, sub.attempts)
        if self.config.scheduler.dynamic_timeout is not None:
            self.telemetry.attempt_timeout.labels(kind).set(limit)
        started = time.monotonic()
        try:
            status, experiences = await runner.run_once(sub, limit)  # raises nothing but CancelledError
        finally:
            self._idle.put_nowait(runner)
            if self.engine_load is not None and sub.engine_order:
                self.engine_load.release(sub.engine_order[0])
        if self.engine_load is not None:
            self.engine_load.mark_down(status.failed_engines, time.monotonic())
        if batch.cancelled:
            return
        if status.ok:
            self.attempt_timeouts.observe(kind, time.monotonic() - started)
        retry = not status.ok and sub.attempts < self.config.scheduler.max_retry_times
        self.telemetry.attempt(kind, status.metric.get("run_seconds"), status.requests, status.failed_engines, retry)
        if retry:
            sub.attempts += 1
            batch.retries += 1
            self._push(sub, batch, retry=True)  # the next idle runner, usually another one, takes it
            self._wake.set()
            return
        self._finish(sub, batch, status, experiences, versions)

    def _finish(
        self,
        sub: TaskWrapper,
        batch: _Batch,
        status: Status,
        experiences: list[Experience],
        versions: Sequence[str | None] | None,
    ) -> None:
        """A sub-task's final outcome: its experiences labelled with the engine (and version) that served them."""
        for exp in experiences:
            exp.batch_id = str(sub.batch_id)
            if status.served_by:
                exp.info["engine"] = status.served_by[-1]
                if versions is not None:
                    exp.info["engine_version"] = versions[status.served_by[-1]]
        kind, eval_set = telemetry_mod.batch_kind(sub.batch_id)
        result = batch.tasks[sub.index]
        result.runs.append((status, sub.repeat_times))
        result.experiences.extend(experiences)
        if len(result.runs) == result.subtasks:
            result.finished = time.monotonic()
            batch.done.append(sub.index)
            ok = all(s.ok for s, _ in result.runs)
            if not ok:
                batch.failures += 1
            self.telemetry.task(kind, eval_set, ok, result.experiences)
            batch.changed.set()

    # ---- collecting ------------------------------------------------------------------------------------
    def _default_timeout(self) -> float:
        sched = self.config.scheduler
        return sched.task_timeout_seconds * (sched.max_retry_times + 1)

    def _cancel(self, batch: _Batch) -> None:
        """Stop the batch's work: running attempts cancelled (on the runners too), queued sub-tasks dropped."""
        batch.cancelled = True
        for job in list(batch.running):
            job.cancel()
        if any(entry[-1] is batch for entry in self._pending):
            self._pending = [entry for entry in self._pending if entry[-1] is not batch]
            heapq.heapify(self._pending)
        batch.changed.set()

    def _forget(self, batch: _Batch) -> None:
        if self._batches.get(batch.batch_id) is batch:
            del self._batches[batch.batch_id]

    def _clear(self, batch: _Batch) -> None:
        """Cancel and forget the batch's unfinished tasks (their ids go to ``cleared``); finished results not yet
        collected move to a fresh batch of the same id, so they stay collectable and the id can be scheduled again."""
        self._cancel(batch)
        self._forget(batch)
        unfinished = sorted(r.task_id for r in batch.tasks.values() if r.finished is None)
        if unfinished:
            self.cleared.setdefault(batch.batch_id, []).extend(unfinished)
            log.warning("batch %s: cleared %d unfinished tasks at a timeout", batch.batch_id, len(unfinished))
        left = batch.done[batch.collected :]
        if left:
            self._batches[batch.batch_id] = _Batch(
                batch.batch_id, tasks={i: batch.tasks[i] for i in left}, done=list(left),
                next_index=batch.next_index, retries=batch.retries, failures=batch.failures,
            )  # fmt: skip

    async def get_results(
        self,
        batch_id: BatchId,
        min_num: int | None = None,
        timeout: float | None = None,
        clear_timeout_tasks: bool = True,
    ) -> tuple[list[Status], list[Experience]]:
        """Wait for the batch's uncollected tasks (or ``min_num`` of them), then return and drain the finished ones
        (at most ``min_num``). ``timeout``: seconds (``math.inf``: no limit; None: the default, one task's attempts);
        when it expires, ``clear_timeout_tasks`` cancels the batch's unfinished tasks."""
        batch = self._batches.get(batch_id)
        if batch is None:
            return [], []
        open_tasks = len(batch.tasks) - batch.collected
        want = open_tasks if min_num is None else max(0, min(min_num, open_tasks))
        deadline = time.monotonic() + (timeout if timeout is not None else self._default_timeout())
        while batch.uncollected() < want and not batch.cancelled:
            batch.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(batch.changed.wait(), None if math.isinf(remaining) else remaining)
            except TimeoutError:
                break
        timed_out = batch.uncollected() < want
        if batch.cancelled:  # cleared meanwhile (wait_all): what had finished is in a fresh batch
            replacement = self._batches.get(batch_id)
            if replacement is None:
                return [], []
            batch, timed_out = replacement, False
        end = len(batch.done) if min_num is None else min(len(batch.done), batch.collected + max(0, min_num))
        fresh = batch.done[batch.collected : end]
        batch.collected = end
        statuses = [batch.tasks[i].combined() for i in fresh]
        experiences = [e for i in fresh for e in batch.tasks[i].experiences]
        for i in fresh:
            batch.tasks[i].experiences = []  # the caller's now
        batch.collected_experiences += len(experiences)
        self._record_metrics(batch)
        if timed_out and clear_timeout_tasks:
            self._clear(batch)  # nothing finished is left behind: a timeout returns every finished result
        elif batch.collected == len(batch.tasks):
            self._forget(batch)
        return statuses, experiences

    def _record_metrics(self, batch: _Batch) -> None:
        """The batch's figures over every task collected so far."""
        results = [batch.tasks[i] for i in batch.done[: batch.collected]]
        finished = [r.finished for r in results if r.finished is not None]
        if not finished:
            return
        latencies = sorted(f - r.started for r in results if (f := r.finished) is not None)
        span = max(finished) - min(r.started for r in results)
        tasks, experiences = len(results), batch.collected_experiences
        self.metrics[batch.batch_id] = {
            "tasks": tasks,
            "experiences": experiences,
            "tasks_per_second": tasks / span if span > 0 else float(tasks),
            "experiences_per_second": experiences / span if span > 0 else float(experiences),
            "latency_p50": latencies[len(latencies) // 2],
            "latency_p95": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            "retries": batch.retries,
            "failures": batch.failures,
        }

    async def wait_all(self, timeout: float | None = None, clear_timeout_tasks: bool = True) -> None:
        """Wait until every scheduled task finished (results stay collectable); TimeoutError when none finishes
        within ``timeout``, after clearing the unfinished tasks if ``clear_timeout_tasks``."""
        limit = timeout if timeout is not None else self._default_timeout()
        while True:
            open_batches = [b for b in self._batches.values() if not b.cancelled and len(b.done) < len(b.tasks)]
            if not open_batches:
                return
            waiters = [asyncio.create_task(b.changed.wait()) for b in open_batches]
            for b in open_batches:
                b.changed.clear()
            finished, pending = await asyncio.wait(
                waiters, timeout=None if math.isinf(limit) else limit, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in pending:
                waiter.cancel()
            if not finished:
                if clear_timeout_tasks:
                    for b in open_batches:
                        self._clear(b)
                raise TimeoutError(f"no task finished within {limit:g}s")

    def has_step(self, batch_id: BatchId) -> bool:
        return batch_id in self._batches

    def uncollected_task_ids(self, batch_id: BatchId) -> list[int]:
        """Task ids of the batch that ``get_results`` has not returned yet (running, queued or finished)."""
        batch = self._batches.get(batch_id)
        if batch is None:
            return []
        returned = set(batch.done[: batch.collected])
        return sorted(r.task_id for i, r in batch.tasks.items() if i not in returned)
