"""The seed's collection semantics on real Ray runner actors with zero-latency workflows (no engine is called):
``min_num`` counts results not yet collected, a cleared batch is forgotten, no runner error drops a sub-task, a
step-wise run is whole however many experiences it returns, and a step whose wait expires is never committed
silently (issue #13, "the seed's semantics exactly")."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from explorer import config, scheduler, sink
from explorer import explorer as explorer_mod
from explorer.workflows import Task

pytestmark = pytest.mark.usefixtures("ray_cluster")
WORKFLOWS = "tests.runtime.instant_workflows"


def instant_config(**overrides: Any) -> config.ExplorerConfig:
    body: dict[str, Any] = {
        "job": "test", "namespace": "local",
        "rollout": {"name": "rollout", "model": {"path": "tiny", "servedName": "tiny"},  # never dialled
                    "engines": [{"index": 0, "url": "http://127.0.0.1:9", "rankOffset": 1, "worldSize": 1}]},
        "taskset": {"path": "/unused.jsonl"},
        "workflow": {"name": "custom", "importPath": f"{WORKFLOWS}:InstantWorkflow"},
        "explore": {"repeatTimes": 1},
        "scheduler": {"runnersPerEngine": 4, "maxRetryTimes": 1, "taskTimeoutSeconds": 30},
    }  # fmt: skip
    for key, value in overrides.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return config.ExplorerConfig.model_validate(body)


def task(task_id: int, **raw: Any) -> Task:
    return Task(task_id=task_id, prompt=f"task {task_id}", raw=raw)


async def running_scheduler(cfg: config.ExplorerConfig) -> scheduler.Scheduler:
    sched = scheduler.Scheduler(cfg, cfg.rollout)
    await sched.start()
    return sched


def test_min_num_waits_for_results_not_yet_collected_and_returns_at_most_that_many() -> None:
    """A second ``get_results(min_num=2)`` returned at once with nothing: min_num counted collected tasks."""

    async def scenario() -> None:
        sched = await running_scheduler(instant_config())
        try:
            sched.schedule([task(0), task(1), task(2, sleep=2), task(3, sleep=2)], batch_id=1)
            first, first_exps = await sched.get_results(1, min_num=2, timeout=30)
            second, second_exps = await sched.get_results(1, min_num=2, timeout=30)
            assert len(first) == 2 and len(second) == 2
            assert sorted(e.task_id for e in first_exps + second_exps) == [0, 1, 2, 3]
            assert not sched.has_step(1)
            sched.schedule([task(i) for i in range(3)], batch_id=2)
            await sched.wait_all(timeout=30)
            counts = [len((await sched.get_results(2, min_num=k))[0]) for k in (1, 5)]
            assert counts == [1, 2] and not sched.has_step(2)
        finally:
            await sched.stop()

    asyncio.run(scenario())


def test_a_batch_cleared_by_wait_all_is_forgotten_and_its_id_runs_again() -> None:
    """The cleared batch stayed registered: scheduling its id again silently ran nothing."""

    async def scenario() -> None:
        sched = await running_scheduler(instant_config())
        try:
            sched.schedule([task(0), task(1, sleep=60)], batch_id=1)
            with pytest.raises(TimeoutError):
                await sched.wait_all(timeout=3)
            sched.schedule([task(2)], batch_id=1)
            statuses, experiences = await sched.get_results(1, timeout=30)
            assert [s.ok for s in statuses] == [True, True]
            assert sorted(e.task_id for e in experiences) == [0, 2]  # 0 had finished before the clear: kept
            assert sched.cleared == {1: [1]} and not sched.has_step(1)
        finally:
            await sched.stop()

    asyncio.run(scenario())


def test_a_runner_whose_replacement_fails_retries_the_sub_task_instead_of_dropping_it(tmp_path: Path) -> None:
    """A failed actor restart escaped the runner and dropped the sub-task; its batch could only time out."""
    cfg = instant_config(
        workflow={"importPath": f"{WORKFLOWS}:ReplacementFailsOnceWorkflow", "args": {"markers": str(tmp_path)}},
        scheduler={"runnersPerEngine": 1, "maxRetryTimes": 2},
    )

    async def scenario() -> None:
        sched = await running_scheduler(cfg)
        try:
            sched.schedule([task(0)], batch_id=1)
            statuses, experiences = await sched.get_results(1, timeout=90)  # dropped: this waited 90 s for nothing
            assert [s.ok for s in statuses] == [True] and [e.task_id for e in experiences] == [0]
            assert (tmp_path / "died").exists() and (tmp_path / "refused").exists()  # the first replacement failed
            # Attempt 1: the process died, its replacement failed; 2: found dead, replaced; 3: ran.
            assert sched.metrics[1]["retries"] == 2
        finally:
            await sched.stop()

    asyncio.run(scenario())


def test_step_wise_runs_with_one_experience_per_turn_complete_without_retries() -> None:
    """``ok`` was ``len(experiences) == repeat_times``: an agent returning one experience per turn was retried."""
    cfg = instant_config(explore={"repeatTimes": 2}, scheduler={"maxRepeatTimesPerRunner": 1})

    async def scenario() -> None:
        sched = await running_scheduler(cfg)
        try:
            sched.schedule([task(i, turns=3) for i in range(3)], batch_id=1)
            statuses, experiences = await sched.get_results(1, timeout=30)
            assert len(statuses) == 3 and all(s.ok for s in statuses), [s.message for s in statuses]
            assert len(experiences) == 3 * 2 * 3
            assert sorted({(e.task_id, e.run_id) for e in experiences}) == [(t, r) for t in range(3) for r in range(2)]
            assert all(s.metric["experiences_per_run"] == 3.0 for s in statuses)
            assert sched.metrics[1]["retries"] == 0 and sched.metrics[1]["failures"] == 0
        finally:
            await sched.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("policy", ["commit", "wait"])  # commit: the default
def test_a_step_whose_wait_expires_is_never_committed_silently(tmp_path: Path, policy: str) -> None:
    """The step was committed with the tasks that finished and nothing said so. One runner, two 2.5 s tasks, a 4 s
    step wait: the second task is still running when it expires."""
    rows = [json.dumps({"question": f"q{i}", "answer": "1", "sleep": 2.5}) for i in range(2)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    cfg = instant_config(
        taskset={"path": str(tmp_path / "train.jsonl")},
        explore={"batchSize": 2, "totalSteps": 1, **({"onStepTimeout": policy} if policy == "wait" else {})},
        scheduler={"runnersPerEngine": 1, "maxRetryTimes": 0, "taskTimeoutSeconds": 4},
        experiences={"path": str(tmp_path / "out"), "format": "parquet"},
    )
    explorer = explorer_mod.Explorer(cfg)
    asyncio.run(explorer.explore())
    out = sink.ExperienceSink(tmp_path / "out")
    entry = out.manifest()["steps"]["1"]
    if policy == "commit":
        assert (entry["experiences"], entry["missingTasks"], explorer.report.missing_tasks) == (1, [1], 1)
        assert [e.task_id for e in out.read_step(1)] == [0]
    else:
        assert (entry["experiences"], entry["missingTasks"], explorer.report.missing_tasks) == (2, [], 0)
        assert sorted(e.task_id for e in out.read_step(1)) == [0, 1]
    assert explorer.report.phase == "Succeeded" and explorer.report.failed_tasks == 0


def over_rollout_config(tmp_path: Path, steps: int) -> config.ExplorerConfig:
    """Batches of 4 with one straggler each (the first row of every batch sleeps 3 s); commit after 3 tasks."""
    rows = [json.dumps({"question": f"q{i}", "answer": "1", "sleep": 3 if i % 4 == 0 else 0}) for i in range(4 * steps)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    return instant_config(
        taskset={"path": str(tmp_path / "train.jsonl")},
        explore={"batchSize": 4, "totalSteps": steps, "overRollout": {"minTasks": 3}},
        experiences={"path": str(tmp_path / "out"), "format": "jsonl"},
    )


def committed_pairs(out: sink.ExperienceSink) -> dict[int, list[tuple[str, int]]]:
    return {
        step: sorted((e.batch_id, e.task_id) for e in out.read_step(step)) for step in sorted(out.committed_steps())
    }


def test_over_rollout_commits_a_step_without_its_straggler_and_a_later_step_with_it(tmp_path: Path) -> None:
    """Trinity-RFT's over_rollout: a step does not wait for its slowest task; the straggler keeps running, keeps its
    batch id, and is committed exactly once by a later step (the last step waits for every straggler)."""
    explorer = explorer_mod.Explorer(over_rollout_config(tmp_path, steps=2))
    carried: dict[int, int] = {}
    explorer.on_step = lambda step, _: carried.__setitem__(step, explorer.report.carried_tasks)
    asyncio.run(explorer.explore())
    out = sink.ExperienceSink(tmp_path / "out")
    pairs = committed_pairs(out)
    assert pairs[1] == [("1", 1), ("1", 2), ("1", 3)]  # the straggler (task 0) did not hold step 1
    assert out.manifest()["steps"]["1"]["pendingTasks"] == {"1": {"cursor": 0, "tasks": [0]}}
    assert sorted(pairs[2]) == [("1", 0), ("2", 0), ("2", 1), ("2", 2), ("2", 3)]  # adopted; the last step waits
    assert "pendingTasks" not in out.manifest()["steps"]["2"]
    assert carried == {1: 1, 2: 0} and explorer.report.phase == "Succeeded"


class CrashAfterStepError(Exception):
    pass


def test_a_restart_runs_the_stragglers_of_the_last_committed_step_again_exactly_once(tmp_path: Path) -> None:
    """The coordinator dies after committing step 1 with its straggler still running: the manifest's pendingTasks
    tells the restarted explorer to run that task again, and step 2 commits it; nothing lost, nothing twice."""
    cfg = over_rollout_config(tmp_path, steps=2)
    first = explorer_mod.Explorer(cfg)

    def crash(step: int, _: dict[str, float]) -> None:
        raise CrashAfterStepError(f"killed after step {step}")

    first.on_step = crash
    with pytest.raises(CrashAfterStepError):
        asyncio.run(first.explore())
    out = sink.ExperienceSink(tmp_path / "out")
    assert out.committed_steps() == {1} and out.pending_tasks(1) == {1: (0, [0])}
    resumed = explorer_mod.Explorer(cfg)
    asyncio.run(resumed.explore())
    pairs = committed_pairs(out)
    every = [pair for step in pairs.values() for pair in step]
    assert sorted(every) == sorted({(str(b), t) for b in (1, 2) for t in range(4)}) and len(every) == 8
    assert ("1", 0) in pairs[2]
