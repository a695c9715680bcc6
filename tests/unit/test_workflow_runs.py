"""What a run is: ``ok`` means every run completed, however many experiences (turns) each produced; metrics are means
over runs (in-process WorkflowRunner and Scheduler, unit only)."""

from __future__ import annotations

import asyncio
from typing import Any

from explorer import config, scheduler, workflow_runner
from explorer.experience import Experience
from explorer.inference import InferenceModel
from explorer.workflow_runner import Status, WorkflowRunner
from explorer.workflows import Task


class TurnsWorkflow:
    """Unit-test step-wise agent: run ``i`` of a task returns ``task.raw['turns'][i]`` experiences (one per turn),
    each with reward ``task.raw['rewards'][i]``; no model call."""

    def __init__(self, spec: config.WorkflowSpec):
        self.spec = spec

    async def run(self, task: Task, model: InferenceModel, repeat_times: int, run_id_base: int) -> list[Experience]:
        turns, rewards = task.raw["turns"], task.raw["rewards"]
        return [
            Experience(tokens=[1, 2, 3][: 2 + turn % 2], prompt_length=1, logprobs=[0.0], reward=rewards[run],
                       task_id=task.task_id, run_id=run)
            for run in range(run_id_base, run_id_base + repeat_times)
            for turn in range(turns[run])
        ]  # fmt: skip


def runner_config(repeat: int = 2) -> config.ExplorerConfig:
    return config.ExplorerConfig.model_validate({
        "job": "u", "namespace": "n", "taskset": {"path": "/t"}, "explore": {"repeatTimes": repeat},
        "rollout": {"name": "r", "model": {"path": "/m"}, "engines": []},
        "workflow": {"name": "custom", "importPath": "tests.unit.test_workflow_runs:TurnsWorkflow"},
        "scheduler": {"runnersPerEngine": 1, "maxRetryTimes": 2},
    })  # fmt: skip


def turns_task(turns: list[int], rewards: list[float]) -> Task:
    return Task(0, "p", raw={"turns": turns, "rewards": rewards})


def run_task(task: Task, repeat_times: int, run_id_base: int = 0) -> tuple[Status, list[Experience]]:
    runner = WorkflowRunner(runner_config(), model=None)  # type: ignore[arg-type]
    return asyncio.run(runner.run_task(task, repeat_times, run_id_base))


def test_a_step_wise_run_with_several_experiences_is_complete_and_metrics_are_means_over_runs() -> None:
    """Issue #13: ``ok`` was ``len(experiences) == repeat_times``: agents with one experience per turn failed."""
    status, experiences = run_task(turns_task([1, 3], [1.0, 0.0]), repeat_times=2)
    assert status.ok and status.message is None and len(experiences) == 4
    assert status.metric["reward_mean"] == 0.5  # (1 + 0) / 2 runs, not 1/4 over the experiences
    assert status.metric["experiences_per_run"] == 2.0


def test_a_run_without_any_experience_is_incomplete_and_named() -> None:
    status, experiences = run_task(turns_task([0, 0, 2, 0, 1], [0.0] * 5), repeat_times=3, run_id_base=2)
    assert not status.ok and len(experiences) == 3
    assert status.message == "2/3 runs completed (no experience for run ids [3])"


def test_runs_and_their_means_are_computed_per_run_id() -> None:
    exps = [Experience(tokens=[1] * (1 + n), prompt_length=1, logprobs=[], reward=r, run_id=run)
            for run, n, r in [(4, 1, 1.0), (4, 3, 0.0), (6, 2, 1.0)]]  # fmt: skip
    missing, metric = workflow_runner.compute_runs(exps, repeat_times=3, run_id_base=4)
    assert missing == [5]
    assert metric == {"reward_mean": 0.75, "response_length_mean": 2.0, "experiences_per_run": 1.5}
    assert workflow_runner.mean_over_runs([({"a": 1.0, "b": 4.0}, 2), ({"a": 0.0}, 1)]) == {"a": 2 / 3, "b": 4.0}


class InProcessRunner:
    """Unit-test backend: the WorkflowRunner called directly."""

    def __init__(self, cfg: config.ExplorerConfig):
        self.runner = WorkflowRunner(cfg, model=None)  # type: ignore[arg-type]

    async def run(self, task: scheduler.TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]:
        return await self.runner.run_task(task.task, task.repeat_times, task.run_id_base)

    async def restart(self) -> None:
        return None

    async def close(self) -> None:
        return None


def test_step_wise_tasks_go_through_the_scheduler_without_retries() -> None:
    cfg = runner_config(repeat=2)

    async def scenario() -> tuple[list[Status], list[Experience], dict[str, Any]]:
        sched = scheduler.Scheduler(cfg, cfg.rollout, runner_count=2, backend_factory=lambda _: InProcessRunner(cfg))
        await sched.start()
        try:
            sched.schedule([turns_task([2, 3], [1.0, 0.0]), turns_task([4, 1], [0.0, 0.0])], batch_id=1)
            statuses, exps = await sched.get_results(1, timeout=5)
            return statuses, exps, sched.metrics[1]
        finally:
            await sched.stop()

    statuses, exps, metrics = asyncio.run(scenario())
    assert [s.ok for s in statuses] == [True, True] and len(exps) == 10
    assert metrics["retries"] == 0 and metrics["failures"] == 0
    assert sorted(s.metric["reward_mean"] for s in statuses) == [0.0, 0.5]
