"""The explorer's step commit with in-process runners (unit only): a step whose wait expires is never committed
silently, and commits run durably off the event loop."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from explorer import config, scheduler, sink
from explorer import explorer as explorer_mod
from explorer.experience import Experience
from explorer.workflow_runner import Status
from tests.unit.test_taskset_and_sink import record_durability


class DelayRunner:
    """Unit-test runner: each task takes ``task.raw['delay']`` seconds, within the attempt's timeout."""

    async def run(self, task: scheduler.TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]:
        try:
            await asyncio.wait_for(asyncio.sleep(float(task.task.raw.get("delay", 0))), timeout)
        except TimeoutError:
            return Status(False, {}, "timed out"), []
        return Status(True, {}), [
            Experience(tokens=[1, 2], prompt_length=1, logprobs=[0.0], reward=1.0, task_id=task.task.task_id,
                       run_id=task.run_id_base + i)
            for i in range(task.repeat_times)
        ]  # fmt: skip

    async def restart(self) -> None:
        return None

    async def close(self) -> None:
        return None


@pytest.fixture
def in_process_runners(monkeypatch: pytest.MonkeyPatch) -> None:
    """The explorer's scheduler with one in-process ``DelayRunner`` per runner slot instead of Ray actors."""
    real = scheduler.Scheduler

    def make(cfg: config.ExplorerConfig, rollout: Any, aux: Any = None, **kwargs: Any) -> scheduler.Scheduler:
        return real(cfg, rollout, aux, backend_factory=lambda _: DelayRunner(), **kwargs)

    monkeypatch.setattr(scheduler, "Scheduler", make)


def explorer_config(tmp_path: Path, delay: float, steps: int = 1, **explore: Any) -> config.ExplorerConfig:
    rows = [json.dumps({"question": f"q{i}", "answer": "1", "delay": delay}) for i in range(2)]
    (tmp_path / "train.jsonl").write_text("\n".join(rows) + "\n")
    return config.ExplorerConfig.model_validate({
        "job": "u", "namespace": "n", "taskset": {"path": str(tmp_path / "train.jsonl")},
        "rollout": {"name": "r", "model": {"path": "/m"},
                    "engines": [{"index": 0, "url": "http://127.0.0.1:9", "rankOffset": 1, "worldSize": 1}]},
        "explore": {"batchSize": 2, "repeatTimes": 1, "totalSteps": steps, **explore},
        "scheduler": {"runnersPerEngine": 1, "maxRetryTimes": 0, "taskTimeoutSeconds": 1.5},
        "experiences": {"path": str(tmp_path / "out"), "format": "jsonl"},
    })  # fmt: skip


@pytest.mark.usefixtures("in_process_runners")
def test_a_step_whose_wait_expires_is_committed_with_its_missing_tasks_recorded(tmp_path: Path) -> None:
    """Issue #13: the step was committed with the tasks that finished, silently. One runner, two 1 s tasks, a 1.5 s
    step wait: the second task is still running when the wait expires."""
    explorer = explorer_mod.Explorer(explorer_config(tmp_path, delay=1.0))
    asyncio.run(explorer.explore())
    entry = sink.ExperienceSink(tmp_path / "out").manifest()["steps"]["1"]
    assert (entry["experiences"], entry["missingTasks"]) == (1, [1])
    assert explorer.report.missing_tasks == 1 and explorer.report.failed_tasks == 0
    assert json.loads(explorer.report.message)["missing_tasks"] == 1


@pytest.mark.usefixtures("in_process_runners")
def test_a_step_can_wait_past_its_timeout_for_every_task(tmp_path: Path) -> None:
    explorer = explorer_mod.Explorer(explorer_config(tmp_path, delay=1.0, onStepTimeout="wait"))
    asyncio.run(explorer.explore())
    out = sink.ExperienceSink(tmp_path / "out")
    assert out.manifest()["steps"]["1"]["missingTasks"] == []
    assert sorted(e.task_id for e in out.read_step(1)) == [0, 1] and explorer.report.missing_tasks == 0


def test_the_step_timeout_policy_defaults_to_commit_and_is_validated() -> None:
    assert config.ExploreSpec().on_step_timeout == "commit"
    with pytest.raises(ValueError, match="onStepTimeout"):
        config.ExploreSpec.model_validate({"onStepTimeout": "drop"})


@pytest.mark.usefixtures("in_process_runners")
def test_step_commits_and_state_writes_run_off_the_event_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #13: writing a step blocked the loop that also dispatches tasks and serves the status and sync APIs."""
    threads: list[tuple[str, int]] = []

    def recorded(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            threads.append((name, threading.get_ident()))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(sink.ExperienceSink, "commit", recorded("commit", sink.ExperienceSink.commit))
    monkeypatch.setattr(explorer_mod, "_save_state", recorded("state", explorer_mod._save_state))
    asyncio.run(explorer_mod.Explorer(explorer_config(tmp_path, delay=0, steps=2)).explore())
    assert [name for name, _ in threads] == ["commit", "state", "commit", "state"]
    assert all(ident != threading.get_ident() for _, ident in threads)  # asyncio.run's loop runs on this thread


def test_the_explorer_state_is_written_durably(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = record_durability(monkeypatch)
    explorer_mod._save_state(tmp_path, explorer_mod.ExplorerState(3, 9))
    assert events == [("fsync", explorer_mod.STATE_FILE), ("replace", explorer_mod.STATE_FILE), ("fsync", "<dir>")]
    assert explorer_mod.load_state(tmp_path) == explorer_mod.ExplorerState(3, 9)


def test_a_coordinator_explores_only_once_every_engine_answers_health(tmp_path: Path) -> None:
    """Found on real pods: the coordinator started minutes before its engines had loaded the model, and committed
    its first steps with zero experiences (every request refused). Here an engine's /health fails three times."""
    from aiohttp import web

    answers = iter([503, 503, 503])
    seen: list[str | None] = []

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=next(answers, 200))

    async def scenario() -> None:
        app = web.Application()
        app.router.add_get("/health", health)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        cfg = explorer_config(tmp_path, delay=0).model_copy(deep=True)
        cfg.rollout.engines[0].url = f"http://127.0.0.1:{port}"
        explorer = explorer_mod.Explorer(cfg)

        async def watch() -> None:
            while True:
                seen.append(explorer.report.waiting_for)
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait_for(explorer_mod.wait_for_engines(explorer, period=0.05), 10)
        finally:
            watcher.cancel()
            await runner.cleanup()
        assert explorer.report.waiting_for is None

    asyncio.run(scenario())
    assert next(answers, None) is None, "it returned before the engine answered 200"
    assert "engines 0 to answer /health" in seen


class CountingSync:
    """Unit-test stand-in for the sync coordinator's push count: each wait is answered by one more push, except the
    one named by ``crash_at``, where the coordinator dies waiting."""

    def __init__(self, syncs: int, crash_at: int | None = None):
        self.syncs, self.crash_at = syncs, crash_at
        self.version: int | None = syncs or None
        self.engines_in_sync = self.last_sync_time = self.last_sync_duration = self.last_sync_bytes = None
        self.waited: list[int] = []
        self.on_version: Any = None
        self.experiences: Any = None
        self.engine_versions: list[str | None] = [None]  # unknown: every engine stays in the rotation

    async def wait_for_syncs(self, count: int) -> None:
        self.waited.append(count)
        if count == self.crash_at:
            raise RuntimeError("coordinator killed while waiting for the trainer")
        self.syncs = self.version = count


@pytest.mark.usefixtures("in_process_runners")
def test_a_resumed_explorer_waits_for_the_push_of_every_boundary_it_passed(tmp_path: Path) -> None:
    """Fixed style, a sync after every step: the coordinator dies after step 2 while waiting for push #2. Restarted
    with the job's 1 push on record, the boundary after step 3 must wait for push #3; counting pushes from the
    restart, it took push #2 (meant for step 2) as step 3's and explored step 4 a policy behind."""
    cfg = explorer_config(
        tmp_path,
        delay=0,
        steps=4,
    ).model_copy(deep=True)
    cfg.sync.style = "fixed"
    first = CountingSync(syncs=0, crash_at=2)
    with pytest.raises(RuntimeError, match="killed"):
        asyncio.run(explorer_mod.Explorer(cfg, sync=first).explore())  # type: ignore[arg-type]
    assert first.waited == [1, 2]
    assert explorer_mod.load_state(Path(cfg.experiences.path)).step == 2
    restarted = CountingSync(syncs=first.syncs)
    asyncio.run(explorer_mod.Explorer(cfg, sync=restarted).explore())  # type: ignore[arg-type]
    assert restarted.waited == [3]  # step 4 is the last: nothing is explored after it, so it waits for no push


class SilentTrainer(CountingSync):
    """A trainer that has gone: no push arrives until ``push()`` is called."""

    def __init__(self) -> None:
        super().__init__(syncs=0)
        self.pushed = asyncio.Event()

    async def wait_for_syncs(self, count: int) -> None:
        self.waited.append(count)
        await self.pushed.wait()
        self.syncs = self.version = count


def fixed_style(tmp_path: Path, timeout: float, action: str) -> config.ExplorerConfig:
    cfg = explorer_config(tmp_path, delay=0, steps=3).model_copy(deep=True)
    cfg.sync.style, cfg.sync.trainer_timeout_seconds, cfg.sync.on_trainer_timeout = "fixed", timeout, action  # type: ignore[assignment]
    return cfg


@pytest.mark.usefixtures("in_process_runners")
def test_a_gone_trainer_fails_the_explorer_with_a_final_reason_when_told_to(tmp_path: Path) -> None:
    ex = explorer_mod.Explorer(fixed_style(tmp_path, 0.3, "Fail"), sync=SilentTrainer())  # type: ignore[arg-type]
    with pytest.raises(explorer_mod.TrainerTimeoutError, match=r"no push from the trainer for 0.3s"):
        asyncio.run(ex.explore())
    assert ex.report.phase == "Failed" and ex.report.failure_reason == explorer_mod.TRAINER_TIMEOUT
    assert "sync.trainerTimeoutSeconds" in ex.report.message and "waits for push #1" in ex.report.message
    assert explorer_mod.load_state(Path(ex.config.experiences.path)).step == 1  # step 1 kept: a resume starts at 2


@pytest.mark.usefixtures("in_process_runners")
def test_an_overdue_trainer_is_reported_while_the_explorer_keeps_waiting(tmp_path: Path) -> None:
    trainer = SilentTrainer()
    ex = explorer_mod.Explorer(fixed_style(tmp_path, 0.2, "Wait"), sync=trainer)  # type: ignore[arg-type]
    seen: list[bool] = []

    async def scenario() -> None:
        exploring = asyncio.ensure_future(ex.explore())
        while not ex.report.trainer_overdue:  # noqa: ASYNC110 - polling the report, as the status API does
            await asyncio.sleep(0.05)
        seen.append(ex.report.trainer_overdue)
        assert ex.report.waiting_for and "push #1" in ex.report.waiting_for
        await asyncio.sleep(0.5)
        assert not exploring.done()  # still waiting, not failed
        trainer.pushed.set()  # the trainer is back: every later wait is answered at once
        await exploring

    asyncio.run(scenario())
    assert seen == [True] and not ex.report.trainer_overdue and ex.report.waiting_for is None
    assert ex.report.phase != "Failed" and trainer.waited == [1, 2]


def test_an_experience_from_an_engine_at_another_version_carries_that_engines_version(tmp_path: Path) -> None:
    explorer = explorer_mod.Explorer(explorer_config(tmp_path, delay=0))

    def made_by(served: str | None) -> Experience:
        return Experience(tokens=[1, 2], prompt_length=1, logprobs=[0.0], reward=0.0,
                          info={"engine": 1, "engine_version": served})  # fmt: skip

    at_version, restarted, behind, unknown = made_by("4"), made_by(None), made_by("3"), Experience([1], 1, [], 0.0)
    explorer._stamp_versions([at_version, restarted, behind, unknown], 4, 0)
    assert (at_version.policy_version, at_version.policy_versions) == (4, [4])
    assert (restarted.policy_version, restarted.policy_versions) == (None, []), "base weights: no pushed version"
    assert (behind.policy_version, behind.policy_versions) == (3, [3])
    assert unknown.policy_version == 4, "no engine picture (no scheduler order): the step's version"


class FirstRunPasses(DelayRunner):
    """Unit-test runner: eval runs pass only as run 0 of each task (reward 1), every other run scores 0."""

    async def run(self, task: scheduler.TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]:
        status, experiences = await super().run(task, timeout)
        for exp in experiences:
            exp.reward = 1.0 if exp.run_id == 0 or not task.task.is_eval else 0.0
        return status, experiences


def test_eval_sets_run_their_own_repeats_and_land_in_the_report_and_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = scheduler.Scheduler
    monkeypatch.setattr(scheduler, "Scheduler", lambda cfg, rollout, aux=None, **kw: real(
        cfg, rollout, aux, backend_factory=lambda _: FirstRunPasses(), **kw))  # fmt: skip
    cfg = explorer_config(tmp_path, delay=0.0, steps=2, evalInterval=2, evalOnStart=True,
                          evalTasksets=[{"name": "held-out", "path": str(tmp_path / "train.jsonl"),
                                         "repeatTimes": 4}])  # fmt: skip
    explorer = explorer_mod.Explorer(cfg)
    asyncio.run(explorer.explore())
    figures = explorer.report.eval["held-out"]
    assert figures.step == 2
    assert figures.metrics["runs"] == 8 and figures.metrics["tasks"] == 2, "two tasks, four runs each"
    assert figures.metrics["mean@4"] == 0.25 and figures.metrics["best@4"] == 1.0
    assert figures.metrics["pass@1"] == 0.25 and figures.metrics["pass@4"] == 1.0
    manifest = sink.ExperienceSink(tmp_path / "out").manifest()
    assert sorted(manifest["eval"]["held-out"]) == ["0", "2"], "on start, then every evalInterval steps"
    assert set(manifest["steps"]) == {"1", "2"}, "eval experiences are not training steps"
