"""The seed's Scheduler contract on real parts: real Ray runner actors against two real CPU vLLM engines."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from explorer import config, engine_metrics, local_engine, scheduler
from explorer.workflows import Task
from tests import waiting
from tests.auth import job_headers

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("ray_cluster")]


def explorer_config(engines: list[local_engine.LocalEngine], **overrides: Any) -> config.ExplorerConfig:
    body: dict[str, Any] = {
        "job": "test",
        "namespace": "local",
        "rollout": {
            "name": "rollout",
            "model": {"path": "tiny", "servedName": "tiny"},
            "engines": [
                {"index": i, "url": e.base_url, "rankOffset": 1 + i, "worldSize": 1} for i, e in enumerate(engines)
            ],
        },
        "taskset": {"path": "/unused.jsonl"},
        "workflow": {"name": "math", "maxTokens": 8},
        "explore": {"repeatTimes": 4},
        "scheduler": {"runnersPerEngine": 2, "maxRetryTimes": 1, "taskTimeoutSeconds": 60},
    }
    for key, value in overrides.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    return config.ExplorerConfig.model_validate(body)


def arithmetic(n: int, **raw: Any) -> list[Task]:
    return [Task(task_id=i, prompt=f"What is {i} plus {i}?", reference=str(2 * i), raw=dict(raw)) for i in range(n)]


async def running_scheduler(cfg: config.ExplorerConfig) -> scheduler.Scheduler:
    sched = scheduler.Scheduler(cfg, cfg.rollout)
    await sched.start()
    return sched


def test_batches_return_every_run_with_tokens_logprobs_and_split_repeats(
    cpu_engines: list[local_engine.LocalEngine],
) -> None:
    cfg = explorer_config(cpu_engines, scheduler={"maxRepeatTimesPerRunner": 3})

    async def scenario() -> None:
        sched = await running_scheduler(cfg)
        try:
            sched.schedule(arithmetic(5), batch_id=1)
            sched.schedule(arithmetic(2), batch_id="1/eval")
            statuses, experiences = await sched.get_results(1)
            assert len(statuses) == 5 and all(s.ok for s in statuses)
            assert len(experiences) == 5 * 4
            runs: dict[int, list[int]] = {}
            for exp in experiences:
                runs.setdefault(exp.task_id, []).append(exp.run_id)
                assert exp.batch_id == "1"
                assert len(exp.logprobs) == exp.response_length > 0
                assert exp.prompt_length > 0 and exp.reward in (0.0, 1.0)
            assert {t: sorted(r) for t, r in runs.items()} == {t: [0, 1, 2, 3] for t in range(5)}  # bases 0 and 3
            eval_statuses, eval_exps = await sched.get_results("1/eval")
            assert len(eval_statuses) == 2 and {e.batch_id for e in eval_exps} == {"1/eval"}
            assert await sched.get_results(1) == ([], [])  # drained
            assert sched.metrics[1]["tasks"] == 5 and sched.metrics[1]["retries"] == 0
        finally:
            await sched.stop()

    asyncio.run(scenario())


def test_min_num_returns_early_and_stragglers_come_later(cpu_engines: list[local_engine.LocalEngine]) -> None:
    cfg = explorer_config(
        cpu_engines,
        workflow={"name": "custom", "importPath": "tests.runtime.workflows_for_tests:SleepyWorkflow"},
        explore={"repeatTimes": 1},
    )

    async def scenario() -> None:
        sched = await running_scheduler(cfg)
        try:
            fast, slow = arithmetic(3), [Task(task_id=9, prompt="What is 1 plus 1?", reference="2", raw={"sleep": 4})]
            sched.schedule(fast + slow, batch_id=7)
            started = time.monotonic()
            statuses, _ = await sched.get_results(7, min_num=3, clear_timeout_tasks=False)
            assert len(statuses) == 3 and time.monotonic() - started < 4
            rest, exps = await sched.get_results(7, timeout=30)
            assert len(rest) == 1 and rest[0].ok and exps[0].task_id == 9
        finally:
            await sched.stop()

    asyncio.run(scenario())


def test_timed_out_attempts_are_cancelled_retried_then_reported(
    cpu_engines: list[local_engine.LocalEngine], tmp_path: Path
) -> None:
    cfg = explorer_config(
        cpu_engines,
        workflow={"name": "custom", "importPath": "tests.runtime.workflows_for_tests:SleepyWorkflow"},
        explore={"repeatTimes": 1},
        scheduler={"taskTimeoutSeconds": 3, "maxRetryTimes": 1},
    )
    marker = tmp_path / "finished"

    async def scenario() -> None:
        sched = await running_scheduler(cfg)
        try:
            hang = Task(task_id=5, prompt="What is 2 plus 2?", reference="4", raw={"sleep": 8, "marker": str(marker)})
            sched.schedule([*arithmetic(2), hang], batch_id=3)
            statuses, experiences = await sched.get_results(3, timeout=30)
            by_ok = sorted(s.ok for s in statuses)
            assert by_ok == [False, True, True]
            failed = next(s for s in statuses if not s.ok)
            assert failed.message is not None and "timed out after 3s" in failed.message
            assert len(experiences) == 2
            assert sched.metrics[3]["retries"] >= 1 and sched.metrics[3]["failures"] == 1
            await asyncio.sleep(8)  # long enough for an uncancelled attempt to finish its sleep
            assert not marker.exists(), "a timed-out attempt kept running on its runner"
            sched.schedule(arithmetic(2), batch_id=4)  # the run goes on
            statuses, _ = await sched.get_results(4, timeout=60)
            assert [s.ok for s in statuses] == [True, True]
        finally:
            await sched.stop()

    asyncio.run(scenario())


def test_a_dynamic_timeout_cuts_a_straggler_s_first_attempt_and_its_retry_completes(
    cpu_engines: list[local_engine.LocalEngine], tmp_path: Path
) -> None:
    """Quick tasks set the observed latency; a task that hangs on its first attempt only is cut after about
    factor x p95 (not the 60 s static limit), retried with the full limit, and completes."""
    cfg = explorer_config(
        cpu_engines,
        workflow={"name": "custom", "importPath": "tests.runtime.workflows_for_tests:SleepyWorkflow"},
        explore={"repeatTimes": 1},
        scheduler={"taskTimeoutSeconds": 60, "maxRetryTimes": 1,
                   "dynamicTimeout": {"minSamples": 4, "factor": 2, "minSeconds": 1, "percentile": 0.9}},
    )  # fmt: skip
    once = tmp_path / "first-attempt"

    async def scenario() -> None:
        sched = await running_scheduler(cfg)
        try:
            sched.schedule(arithmetic(6), batch_id=1)
            assert all(s.ok for s in (await sched.get_results(1, timeout=120))[0])
            limit = sched.attempt_timeouts.timeout("rollout", 0)
            assert 1 <= limit < 20 and sched.attempt_timeouts.timeout("rollout", 1) == 60
            straggler = Task(task_id=7, prompt="What is 1 plus 1?", reference="2",
                             raw={"sleep_once": 40, "once_marker": str(once)})  # fmt: skip
            sched.schedule([straggler], batch_id=2)
            [status], experiences = await sched.get_results(2, timeout=120)
            assert status.ok and len(experiences) == 1 and once.exists()
            # Under the static 60 s limit the 40 s first attempt would have finished without a retry.
            assert sched.metrics[2]["retries"] == 1
        finally:
            await sched.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("processes", [None, 1], ids=["process-per-runner", "shared-process"])
def test_a_runner_killed_mid_task_is_replaced_and_the_task_retried(
    cpu_engines: list[local_engine.LocalEngine], tmp_path: Path, processes: int | None
) -> None:
    cfg = explorer_config(
        cpu_engines,
        workflow={"name": "custom", "importPath": "tests.runtime.workflows_for_tests:DieOnceWorkflow"},
        explore={"repeatTimes": 2},
        scheduler={"runnersPerEngine": 1, "runnerProcesses": processes, "maxRetryTimes": 3},
    )

    async def scenario() -> None:
        sched = await running_scheduler(cfg)
        try:
            tasks = [
                Task(
                    task_id=i,
                    prompt=f"What is {i} plus 1?",
                    reference=str(i + 1),
                    raw={"marker": str(tmp_path / f"m{i}")},
                )
                for i in range(2)
            ]
            sched.schedule(tasks, batch_id=1)
            statuses, experiences = await sched.get_results(1, timeout=120)
            assert [s.ok for s in statuses] == [True, True]
            dead = {int((tmp_path / f"m{i}").read_text()) for i in range(2)}
            assert not any(
                psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in dead
            )
            keys = sorted((e.task_id, e.run_id) for e in experiences)
            assert keys == [(0, 0), (0, 1), (1, 0), (1, 1)]  # nothing lost, nothing duplicated
            assert sched.metrics[1]["retries"] >= 2  # each task died once (a shared process takes both down)
        finally:
            await sched.stop()

    asyncio.run(scenario())


def test_requests_fail_over_to_the_other_engine_when_one_is_down(cpu_engines: list[local_engine.LocalEngine]) -> None:
    from explorer import inference

    async def scenario() -> None:
        dead = inference.OpenAIEngine("http://127.0.0.1:9", "tiny")  # nothing listens on the discard port
        live = inference.OpenAIEngine(cpu_engines[1].base_url, "tiny")
        pool = inference.EnginePool([dead, live])
        try:
            completions = await pool.generate("What is 3 plus 4?", n=2, max_tokens=4)
            assert len(completions) == 2 and all(c.token_ids for c in completions)
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_requests_spread_over_both_engines_counted_by_the_engines_themselves(
    cpu_engines: list[local_engine.LocalEngine],
) -> None:
    """Issue #13: each runner process had its own pool with one request in flight, so all went to engine 0."""
    cfg = explorer_config(cpu_engines, explore={"repeatTimes": 1}, workflow={"name": "math", "maxTokens": 4})
    urls = [e.base_url for e in cpu_engines]

    def running(url: str) -> float:
        metrics = httpx.get(f"{url}/metrics", timeout=10, headers=job_headers()).raise_for_status().text
        return engine_metrics.compute_requests_served(metrics, "vllm:num_requests_running")

    # Least-outstanding routing sends less to a busier engine: start from two idle engines (an earlier test's
    # killed runners can leave requests running on one for a while).
    waiting.wait_for(lambda: all(running(u) == 0 for u in urls), timeout=60, what="both engines idle")
    before = [engine_metrics.fetch_requests_served(u) for u in urls]
    n_tasks = 24

    async def scenario() -> None:
        sched = await running_scheduler(cfg)
        try:
            sched.schedule(arithmetic(n_tasks), batch_id=1)
            statuses, _ = await sched.get_results(1, timeout=120)
            assert len(statuses) == n_tasks and all(s.ok for s in statuses)
        finally:
            await sched.stop()

    asyncio.run(scenario())

    def served() -> list[float] | None:  # the engine may count a request just after its response has gone out
        counts = [engine_metrics.fetch_requests_served(u) - b for u, b in zip(urls, before, strict=True)]
        return counts if sum(counts) >= n_tasks else None

    counts = waiting.wait_for(
        served, timeout=15, what=f"{n_tasks} requests in the engines' {engine_metrics.REQUESTS_METRIC}"
    )
    # Routing is least-outstanding, so a slower engine rightly takes fewer: on a fresh 2-core machine one engine was
    # consistently slower and served 2-3 of 24 (the scheduler itself dispatched [2, 22], no engine marked down). The
    # bug this guards against sent every request to one engine: each must serve some.
    assert min(counts) >= 2, f"requests per engine: {counts}"


def test_chat_workflow_rewards_replies_to_multi_turn_conversations(cpu_engines: list[local_engine.LocalEngine]) -> None:
    cfg = explorer_config(cpu_engines, workflow={"name": "chat", "maxTokens": 6}, explore={"repeatTimes": 2})
    conversation = (
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 plus 3?"},
    )

    async def scenario() -> None:
        sched = await running_scheduler(cfg)
        try:
            sched.schedule([Task(task_id=0, prompt="", reference="6", messages=conversation)], batch_id=1)
            statuses, experiences = await sched.get_results(1)
            assert statuses[0].ok and len(experiences) == 2
            for exp in experiences:
                assert exp.prompt_length > 10  # the whole conversation, templated, is the prompt
                assert len(exp.logprobs) == exp.response_length > 0
                assert exp.reward in (0.0, 1.0)
        finally:
            await sched.stop()

    asyncio.run(scenario())


@pytest.mark.destructive
def test_an_engine_killed_mid_batch_costs_retries_not_tasks(cpu_engines: list[local_engine.LocalEngine]) -> None:
    """Runs last (it kills one of the session's engines): in-flight requests move to the surviving engine."""
    cfg = explorer_config(cpu_engines, workflow={"name": "math", "maxTokens": 48}, explore={"repeatTimes": 2})
    victim = cpu_engines[1]

    async def scenario() -> None:
        sched = await running_scheduler(cfg)
        try:
            sched.schedule(arithmetic(16), batch_id=1)
            await asyncio.sleep(1.0)  # requests are in flight on both engines
            assert victim.pid is not None
            os.killpg(victim.pid, signal.SIGKILL)
            statuses, experiences = await sched.get_results(1, timeout=180)
            assert len(statuses) == 16 and all(s.ok for s in statuses), [s.message for s in statuses if not s.ok]
            assert sorted((e.task_id, e.run_id) for e in experiences) == [(t, r) for t in range(16) for r in range(2)]
        finally:
            await sched.stop()

    asyncio.run(scenario())
