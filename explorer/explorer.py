"""The Explorer: the seed's explore → eval → sync timeline over the scheduler, with resumable state.

Each step takes ``batch_size`` tasks from the taskset (cycling through it), collects their experiences, commits them
to the sink and then records ``(step, cursor)``; the next step is already queued while one is collected, except
across a sync boundary; a restarted coordinator resumes after the last committed step, so no
step is lost or written twice. Evaluation runs every ``eval_interval`` steps as batch ``"{step}/{taskset}"``. Sync
boundaries follow ``sync.interval``/``sync.offset``; the transfer itself is the weight-sync issue's, plugged in via
``sync_hook``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from explorer import config as explorer_config
from explorer import scheduler as scheduler_mod
from explorer import sink, status_api, taskset
from explorer.workflows import Task

log = logging.getLogger(__name__)
STATE_FILE = "explorer-state.json"
SyncHook = Callable[[int], Awaitable[int | None]]


@dataclasses.dataclass
class ExplorerState:
    step: int = 0
    cursor: int = 0


def _save_state(directory: Path, state: ExplorerState) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{STATE_FILE}.", dir=directory)
    with os.fdopen(fd, "w") as handle:
        json.dump(dataclasses.asdict(state), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, directory / STATE_FILE)


def load_state(directory: Path) -> ExplorerState:
    try:
        return ExplorerState(**json.loads((directory / STATE_FILE).read_text()))
    except FileNotFoundError:
        return ExplorerState()


class Explorer:
    """Explores the taskset; ``report`` is what the status API serves."""

    def __init__(self, config: explorer_config.ExplorerConfig, sync_hook: SyncHook | None = None):
        self.config = config
        self.sync_hook = sync_hook
        self.report = status_api.CoordinatorReport(total_steps=config.explore.total_steps)
        self.sink = sink.ExperienceSink(Path(config.experiences.path), config.experiences.format)
        self.policy_version: int | None = None
        self.eval_metrics: dict[str, dict[str, float]] = {}
        self.row_errors: list[taskset.RowError] = []
        self.on_step: Callable[[int, dict[str, float]], None] | None = None

    def need_sync(self, step: int) -> bool:
        sync = self.config.sync
        return step > sync.offset and (step - sync.offset) % sync.interval == 0

    def _batch(self, tasks: list[Task], cursor: int) -> list[Task]:
        size = self.config.explore.batch_size
        return [dataclasses.replace(tasks[(cursor + i) % len(tasks)], task_id=i) for i in range(size)]

    async def explore(self) -> str:
        """Run to ``total_steps`` (or resume there); returns a one-line summary."""
        tasks, self.row_errors = taskset.load_taskset(self.config.taskset)
        evals = [(t.name, taskset.load_taskset(t, is_eval=True)[0]) for t in self.config.explore.eval_tasksets]
        state = load_state(self.sink.directory)
        committed = self.sink.committed_steps()
        if committed and max(committed) > state.step:
            # Committed but the state write did not land: the step is done; advance past it.
            behind = max(committed) - state.step
            state = ExplorerState(max(committed), state.cursor + behind * self.config.explore.batch_size)
        sched = scheduler_mod.Scheduler(self.config, self.config.rollout, self.config.auxiliary)
        await sched.start()
        self.report = self.report.model_copy(update={"phase": "Running", "step": state.step})
        written = 0
        try:
            total, size = self.config.explore.total_steps, self.config.explore.batch_size
            submitted = state.step
            for step in range(state.step + 1, total + 1):
                # Keep the engines busy: the next step is queued behind this one unless a sync lies between them
                # (then its tokens would come from the old policy). An uncommitted step is simply re-run on restart.
                syncing = self.sync_hook is not None and self.need_sync(step)
                horizon = step if syncing else min(step + 1, total)
                while submitted < horizon:
                    submitted += 1
                    sched.schedule(self._batch(tasks, state.cursor + (submitted - step) * size), batch_id=submitted)
                statuses, experiences = await sched.get_results(step)
                for exp in experiences:
                    exp.policy_version = self.policy_version
                self.sink.commit(step, experiences, self.policy_version)
                written += len(experiences)
                state = ExplorerState(step, state.cursor + size)
                _save_state(self.sink.directory, state)
                metrics = {**sched.metrics.get(step, {}), "failed_tasks": sum(1 for s in statuses if not s.ok)}
                if experiences:
                    metrics["reward_mean"] = sum(e.reward for e in experiences) / len(experiences)
                await self._evaluate(sched, step, evals)
                if self.need_sync(step) and self.sync_hook is not None:
                    self.policy_version = await self.sync_hook(step)
                self.report = self.report.model_copy(update={"step": step, "policy_version": self.policy_version,
                                                             "message": json.dumps(metrics)[:500]})  # fmt: skip
                if self.on_step:
                    self.on_step(step, metrics)
        except BaseException as err:
            self.report = self.report.model_copy(update={"phase": "Failed", "message": repr(err)[:500]})
            raise
        finally:
            await sched.stop()
        self.report = self.report.model_copy(update={"phase": "Succeeded"})
        return f"explored {self.config.explore.total_steps} steps; {written} experiences written this run"

    async def _evaluate(self, sched: scheduler_mod.Scheduler, step: int, evals: list[tuple[str, list[Task]]]) -> None:
        interval = self.config.explore.eval_interval
        if not interval or step % interval:
            return
        for name, tasks in evals:
            batch_id = f"{step}/{name}"
            sched.schedule(tasks, batch_id=batch_id)
            _, experiences = await sched.get_results(batch_id)
            rewards = [e.reward for e in experiences]
            self.eval_metrics[batch_id] = {"reward_mean": sum(rewards) / len(rewards) if rewards else 0.0}

    async def setup_weight_sync_group(
        self, master_address: str, master_port: int, state_dict_meta: list[Any] | None = None
    ) -> None:
        raise NotImplementedError("weight sync is delivered by the weight-sync issue (see docs/runtime.md)")

    async def get_weight(self, name: str) -> Any:
        raise NotImplementedError("weight sync is delivered by the weight-sync issue (see docs/runtime.md)")


async def serve_and_explore(explorer: Explorer, host: str, port: int) -> str:
    """Explore while the status API publishes progress; the API outlives a failure so it can be read."""
    server = status_api.StatusServer(host, port, explorer.report)

    async def publish() -> None:
        while True:
            server.report = explorer.report
            await asyncio.sleep(0.2)

    await server.start()
    publisher = asyncio.create_task(publish())
    try:
        return await explorer.explore()
    finally:
        server.report = explorer.report
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        await server.stop()
