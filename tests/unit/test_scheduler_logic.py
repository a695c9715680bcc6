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


def task(task_id: int, delay: float = 0.0) -> Task:
    return Task(task_id, f"t{task_id}", raw={"delay": delay})


def in_process(count: int, runner: object, **scheduler_fields: object) -> scheduler.Scheduler:
    return scheduler.Scheduler(cfg(**scheduler_fields), None, runner_count=count, backend_factory=lambda _: runner)  # type: ignore[arg-type]


def test_min_num_counts_results_not_yet_collected_and_returns_at_most_that_many() -> None:
    """Issue #13: min_num counted tasks already collected, so a second call returned at once with nothing."""

    async def scenario() -> None:
        sched = in_process(4, RecordingRunner([]))
        await sched.start()
        sched.schedule([task(0), task(1), task(2, delay=0.3), task(3, delay=0.3)], batch_id=1)
        first, _ = await sched.get_results(1, min_num=2, timeout=5)
        second, exps = await sched.get_results(1, min_num=2, timeout=5)  # waits for the two slow ones
        assert len(first) == 2 and len(second) == 2 and sorted(e.task_id for e in exps) == [2, 3]
        assert not sched.has_step(1)
        sched.schedule([task(i) for i in range(5)], batch_id=2)
        await sched.wait_all(timeout=5)  # all five finished and uncollected
        assert [len((await sched.get_results(2, min_num=k))[0]) for k in (2, 0, 1, 9)] == [2, 0, 1, 2]
        assert not sched.has_step(2) and sched.metrics[2]["tasks"] == 5
        await sched.stop()

    asyncio.run(scenario())


class CancellableRunner(RecordingRunner):
    """Unit-test runner that also records the attempts cancelled under it."""

    async def run(self, task: scheduler.TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]:
        try:
            return await super().run(task, timeout)
        except asyncio.CancelledError:
            self.log.append(("cancelled", task.task.task_id))
            raise


def test_a_batch_cleared_by_wait_all_is_forgotten_and_its_id_can_be_scheduled_again() -> None:
    """Issue #13: the cleared batch stayed registered; scheduling its id again silently ran nothing."""
    log: list[tuple[str, int]] = []

    async def scenario() -> None:
        sched = in_process(2, CancellableRunner(log))
        await sched.start()
        sched.schedule([task(0), task(1, delay=30)], batch_id=1)
        with pytest.raises(TimeoutError):
            await sched.wait_all(timeout=0.3)
        sched.schedule([task(2)], batch_id=1)  # the same id again: it runs
        statuses, exps = await sched.get_results(1, timeout=5)
        assert len(statuses) == 2 and sorted(e.task_id for e in exps) == [0, 2]  # task 0 had finished: kept
        assert ("cancelled", 1) in log and sched.cleared == {1: [1]}
        assert not sched.has_step(1) and sched._pending == []
        await sched.stop()

    asyncio.run(scenario())


def test_a_batch_cleared_by_a_get_results_timeout_keeps_nothing_in_memory() -> None:
    async def scenario() -> None:
        sched = in_process(1, RecordingRunner([]))
        await sched.start()
        sched.schedule([task(0), task(1, delay=30), task(2)], batch_id=1)  # task 2 queued behind the straggler
        statuses, _ = await sched.get_results(1, timeout=0.3)
        assert len(statuses) == 1 and sched.cleared == {1: [1, 2]}
        assert not sched.has_step(1) and sched._pending == []
        sched.schedule([task(3)], batch_id=1)
        statuses, exps = await sched.get_results(1, timeout=5)
        assert len(statuses) == 1 and exps[0].task_id == 3
        await sched.stop()

    asyncio.run(scenario())


class RaisingRunner:
    """Unit-test runner whose backend raises (an object lost, a failed restart) on the first ``failures`` calls."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    async def run(self, task: scheduler.TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("ObjectLostError: the result was lost")
        return await RecordingRunner([]).run(task, timeout)

    async def restart(self) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(("failures", "ok"), [(1, True), (99, False)], ids=["retried", "recorded"])
def test_a_runner_error_of_any_kind_is_retried_then_recorded_never_dropped(failures: int, ok: bool) -> None:
    """Issue #13: an error other than a timeout, a cancel or a dead actor dropped the sub-task; the step waited out
    its timeout (here the default, 30 minutes) and was committed short."""

    async def scenario() -> None:
        sched = in_process(1, RaisingRunner(failures), maxRetryTimes=2)
        await sched.start()
        sched.schedule([task(0)], batch_id=1)
        statuses, exps = await asyncio.wait_for(sched.get_results(1), 5)
        assert [s.ok for s in statuses] == [ok] and len(exps) == int(ok)
        if not ok:
            assert (
                statuses[0].message is not None
                and "runner 0 failed: RuntimeError: ObjectLostError" in statuses[0].message
            )
        assert sched.metrics[1]["retries"] == (1 if ok else 2)
        await sched.stop()

    asyncio.run(scenario())


class FakeRay:
    """Unit-test stand-in for the ``ray`` module as ``RayRunner`` uses it."""

    class exceptions:  # noqa: N801 (the module's name)
        class RayActorError(Exception):
            pass

    @staticmethod
    def cancel(ref: object) -> None:
        return None


class UnreplaceableHost:
    """Unit-test ``ActorHost`` whose actor is dead and whose replacement fails (its constructor raises)."""

    host_id, generation, _ray = 0, 0, FakeRay

    def __init__(self) -> None:
        self.actor = self
        self.run_task = self
        self.restarts = 0

    def remote(self, *args: object) -> object:
        async def dead() -> None:
            raise FakeRay.exceptions.RayActorError("the actor died")

        return dead()

    async def restart(self, seen_generation: int) -> None:
        self.restarts += 1
        raise FakeRay.exceptions.RayActorError("the replacement died in its constructor")


def test_a_runner_whose_replacement_fails_reports_it_and_the_sub_task_is_recorded() -> None:
    host = UnreplaceableHost()

    async def scenario() -> None:
        sched = in_process(1, scheduler.RayRunner(host), maxRetryTimes=1)  # type: ignore[arg-type]
        await sched.start()
        sched.schedule([task(0)], batch_id=1)
        statuses, _ = await asyncio.wait_for(sched.get_results(1), 5)
        assert [s.ok for s in statuses] == [False] and host.restarts == 2  # every attempt tried a replacement
        assert statuses[0].message is not None
        assert "runner process 0 died (RayActorError) and could not be replaced" in statuses[0].message
        await sched.stop()

    asyncio.run(scenario())


class RewardBySubtaskRunner(RecordingRunner):
    """Unit-test runner: reward 1 for the first sub-task of a task, 0 for the rest."""

    async def run(self, task: scheduler.TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]:
        _, exps = await super().run(task, timeout)
        return Status(True, {"reward_mean": 1.0 if task.run_id_base == 0 else 0.0}), exps


def test_a_split_tasks_metrics_are_means_over_its_runs() -> None:
    async def scenario() -> None:
        sched = in_process(2, RewardBySubtaskRunner([]), maxRepeatTimesPerRunner=2)
        sched.config.explore.repeat_times = 3  # sub-tasks of 2 runs (reward 1) and 1 run (reward 0)
        await sched.start()
        sched.schedule([task(0)], batch_id=1)
        statuses, exps = await sched.get_results(1, timeout=5)
        assert len(exps) == 3 and statuses[0].metric["reward_mean"] == pytest.approx(2 / 3)
        await sched.stop()

    asyncio.run(scenario())
