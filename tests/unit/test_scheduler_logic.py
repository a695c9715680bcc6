"""Scheduler logic in isolation: batch-id ordering, wait_all, and dispatch order (in-process runners, unit only)."""

from __future__ import annotations

import asyncio

import pytest

from explorer import config, scheduler
from explorer.experience import Experience
from explorer.workflow_runner import Status
from explorer.workflows import Task


class RecordingRunner:
    """Unit-test runner: records dispatch order, finishes after a task-defined delay."""

    def __init__(self, log: list[tuple[str, int]]):
        self.log = log

    async def run(self, task: scheduler.TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]:
        self.log.append((str(task.batch_id), task.task.task_id))
        await asyncio.sleep(float(task.task.raw.get("delay", 0)))
        exp = Experience(tokens=[1, 2], prompt_length=1, logprobs=[0.0], reward=1.0, task_id=task.task.task_id)
        return Status(True, {"x": 1.0}), [exp] * task.repeat_times

    async def restart(self) -> None:
        return None

    async def close(self) -> None:
        return None


def cfg(**scheduler_fields: object) -> config.ExplorerConfig:
    return config.ExplorerConfig.model_validate({
        "job": "u", "namespace": "n", "taskset": {"path": "/t"}, "explore": {"repeatTimes": 1},
        "rollout": {"name": "r", "model": {"path": "/m"}, "engines": []},
        "scheduler": {"runnersPerEngine": 1, **scheduler_fields},
    })  # fmt: skip


def test_batch_ids_order_train_steps_then_their_evals_then_names() -> None:
    ids: list[scheduler.BatchId] = ["abc", 3, "2/eval", 2, "3/eval", "10"]
    assert sorted(ids, key=scheduler.batch_key) == [2, "2/eval", 3, "3/eval", "10", "abc"]


def test_earlier_batches_dispatch_first_and_wait_all_waits_for_everything() -> None:
    log: list[tuple[str, int]] = []

    async def scenario() -> None:
        sched = scheduler.Scheduler(cfg(), None, runner_count=1, backend_factory=lambda _: RecordingRunner(log))  # type: ignore[arg-type]
        sched.schedule([Task(0, "a"), Task(1, "b")], batch_id=5)
        sched.schedule([Task(0, "c")], batch_id="4/eval")
        sched.schedule([Task(0, "d")], batch_id=4)
        await sched.start()
        await sched.wait_all(timeout=5)
        assert log == [("4", 0), ("4/eval", 0), ("5", 0), ("5", 1)]
        statuses, exps = await sched.get_results(5)
        assert len(statuses) == 2 and len(exps) == 2  # wait_all leaves results collectable
        await sched.stop()

    asyncio.run(scenario())


def test_wait_all_raises_when_nothing_finishes_in_time() -> None:
    async def scenario() -> None:
        sched = scheduler.Scheduler(cfg(), None, runner_count=1, backend_factory=lambda _: RecordingRunner([]))  # type: ignore[arg-type]
        await sched.start()
        sched.schedule([Task(0, "slow", raw={"delay": 5})], batch_id=1)
        with pytest.raises(TimeoutError, match=r"no task finished within 0\.2s"):
            await sched.wait_all(timeout=0.2)
        assert await sched.get_results(1) == ([], [])  # cleared: the straggler was cancelled
        await sched.stop()

    asyncio.run(scenario())
