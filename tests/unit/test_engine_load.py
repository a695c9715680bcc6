"""Engine choice across a whole job (issue #13, item 1: every request went to engine 0), and counting at the engine.

Each runner is its own process with its own pool and one request in flight, so a per-pool "least outstanding" saw
only zeros and a stable sort picked engine 0 every time: 8 runners, 2 engines, 160 requests gave 160 and 0. These
tests give every runner its own ``EnginePool`` (as in separate Ray actors) over an in-process HTTP transport.
"""

from __future__ import annotations

import asyncio
import collections
import random
from typing import Any

import httpx

from explorer import config, engine_load, engine_metrics, inference, scheduler
from explorer.experience import Experience
from explorer.workflow_runner import Status, WorkflowRunner
from explorer.workflows import Task

URLS = ["http://engine-0.test", "http://engine-1.test"]


def test_order_is_healthy_first_then_least_loaded_with_ties_rotating_from_start() -> None:
    assert engine_load.build_order([0, 0], [False, False]) == [0, 1]
    assert engine_load.build_order([0, 0], [False, False], start=1) == [1, 0]
    assert engine_load.build_order([3, 1, 1], [False, False, False], start=0) == [1, 2, 0]
    assert engine_load.build_order([0, 5], [True, False]) == [1, 0]  # a down engine only as the last resort


def test_160_requests_from_8_runners_spread_evenly_over_2_engines() -> None:
    load, rng = engine_load.EngineLoad(2), random.Random(13)
    in_flight = [load.acquire(now=0.0)[0] for _ in range(8)]  # every runner takes one request
    for _ in range(160 - 8):  # a random runner finishes and takes the next request
        runner = rng.randrange(len(in_flight))
        load.release(in_flight[runner])
        in_flight[runner] = load.acquire(now=0.0)[0]
    assert sum(load.dispatched) == 160
    assert min(load.dispatched) >= 72, load.dispatched  # 80 each, give or take the random finishing order
    assert load.outstanding == [4, 4]


def test_a_down_engine_is_skipped_until_it_may_be_retried() -> None:
    load = engine_load.EngineLoad(2)
    load.mark_down([1], now=100.0)
    picks = [load.acquire(now=100.0 + i * 0.1) for i in range(20)]
    assert all(order == (0, 1) for order in picks)  # skipped, yet still listed for failover
    load.outstanding = [0, 0]
    assert load.acquire(now=100.0 + engine_load.RETRY_DOWN_AFTER)[0] == 1  # tried again once the window has passed


def completions_body(n: int) -> dict[str, Any]:
    choice = {"text": "42", "logprobs": {"token_logprobs": [-0.1]}, "token_ids": [7], "prompt_token_ids": [1, 2]}
    return {"choices": [{**choice, "index": i, "finish_reason": "length"} for i in range(n)]}


class FakeEngines:
    """Unit-test HTTP transport for every engine: counts requests per engine host, answers after a short delay."""

    def __init__(self, refusing: frozenset[str] = frozenset()):
        self.requests: collections.Counter[str] = collections.Counter()
        self.refusing = refusing
        self.rng = random.Random(0)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests[request.url.host] += 1
        if request.url.host in self.refusing:
            raise httpx.ConnectError("connection refused", request=request)
        await asyncio.sleep(self.rng.uniform(0, 0.002))
        return httpx.Response(200, json=completions_body(1))


class OwnPoolRunner:
    """Unit-test backend: a WorkflowRunner with its own EnginePool, as inside its own Ray actor process."""

    def __init__(self, cfg: config.ExplorerConfig, runner_id: int, transport: httpx.AsyncBaseTransport):
        pool = inference.EnginePool.from_urls(URLS, "tiny", runner_id, transport)
        self.runner = WorkflowRunner(cfg, pool, runner_id=runner_id)

    async def run(self, task: scheduler.TaskWrapper, timeout: float) -> tuple[Status, list[Experience]]:
        return await self.runner.run_task(task.task, task.repeat_times, task.run_id_base, task.engine_order)

    async def restart(self) -> None:
        return None

    async def close(self) -> None:
        await self.runner.close()


def two_engine_config() -> config.ExplorerConfig:
    return config.ExplorerConfig.model_validate({
        "job": "u", "namespace": "n", "taskset": {"path": "/t"}, "explore": {"repeatTimes": 1},
        "rollout": {"name": "r", "model": {"path": "/m", "servedName": "tiny"},
                    "engines": [{"index": i, "url": u, "rankOffset": 1 + i, "worldSize": 1}
                                for i, u in enumerate(URLS)]},
        "workflow": {"name": "math", "maxTokens": 4}, "scheduler": {"runnersPerEngine": 4, "maxRetryTimes": 0},
    })  # fmt: skip


def run_through_scheduler(engines: FakeEngines, n_tasks: int, serving: list[bool] | None = None) -> list[Status]:
    cfg = two_engine_config()
    transport = httpx.MockTransport(engines)

    async def scenario() -> list[Status]:
        sched = scheduler.Scheduler(cfg, cfg.rollout, backend_factory=lambda i: OwnPoolRunner(cfg, i, transport))
        assert len(sched.runners) == 8
        if serving is not None:
            assert sched.engine_load is not None
            sched.engine_load.set_serving(serving)
        await sched.start()
        try:
            sched.schedule([Task(i, f"What is {i} plus 1?", str(i + 1)) for i in range(n_tasks)], batch_id=1)
            statuses, _ = await sched.get_results(1, timeout=30)
            assert sched.engine_load is not None and sched.engine_load.outstanding == [0, 0]
            return statuses
        finally:
            await sched.stop()

    return asyncio.run(scenario())


def test_eight_runners_with_their_own_pools_send_a_fair_share_of_160_requests_to_each_engine() -> None:
    engines = FakeEngines()
    statuses = run_through_scheduler(engines, 160)
    assert len(statuses) == 160 and all(s.ok for s in statuses)
    assert sum(engines.requests.values()) == 160
    assert min(engines.requests[f"engine-{i}.test"] for i in range(2)) >= 64, engines.requests  # >= 40% each
    served_by = [s.served_by for s in statuses]  # what each experience is stamped with (engine, its version)
    assert all(len(engines_) == 1 for engines_ in served_by), served_by
    assert sum(1 for engines_ in served_by if engines_ == (0,)) == engines.requests["engine-0.test"]


def test_requests_move_off_an_engine_that_refuses_and_the_scheduler_stops_choosing_it() -> None:
    engines = FakeEngines(refusing=frozenset({"engine-1.test"}))
    statuses = run_through_scheduler(engines, 160)
    assert len(statuses) == 160 and all(s.ok for s in statuses)  # failover: nothing lost
    assert engines.requests["engine-0.test"] == 160
    assert engines.requests["engine-1.test"] <= 8, engines.requests  # at most each runner's first try
    assert {s.served_by for s in statuses} == {(0,)}, "the engine that answered, not the one that refused"


def test_pools_without_the_schedulers_order_still_rotate_between_equally_idle_engines() -> None:
    engines = FakeEngines()
    transport = httpx.MockTransport(engines)

    async def scenario() -> None:
        pools = [inference.EnginePool.from_urls(URLS, "tiny", first, transport) for first in range(8)]
        for _ in range(20):  # one request in flight per pool, as for a runner running one task at a time
            await asyncio.gather(*(pool.generate("p", max_tokens=1) for pool in pools))
        for pool in pools:
            await pool.close()

    asyncio.run(scenario())
    assert engines.requests == {"engine-0.test": 80, "engine-1.test": 80}


def test_requests_served_sum_every_finish_reason_of_vllms_success_counter() -> None:
    exposition = "\n".join([
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
        'vllm:request_success_total{engine="0",finished_reason="stop",model_name="tiny"} 3.0',
        'vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"} 14.0',
        'vllm:request_success_created{engine="0",finished_reason="stop",model_name="tiny"} 1.7e9',
        'vllm:prompt_tokens_total{engine="0",model_name="tiny"} 250.0',
    ])  # fmt: skip
    assert engine_metrics.compute_requests_served(exposition) == 17.0
    assert engine_metrics.compute_requests_served("") == 0.0
    assert engine_metrics.compute_shares([30.0, 10.0]) == [0.75, 0.25]


def test_only_engines_at_the_jobs_policy_version_are_dispatched_to_and_never_as_a_fallback() -> None:
    engines = FakeEngines()
    statuses = run_through_scheduler(engines, 80, serving=[True, False])
    assert all(s.ok for s in statuses) and engines.requests == {"engine-0.test": 80}, engines.requests

    # The engine at the version refuses: the stale one is not used instead (its tokens would be off-policy).
    refusing = FakeEngines(refusing=frozenset({"engine-0.test"}))
    statuses = run_through_scheduler(refusing, 8, serving=[True, False])
    assert not any(s.ok for s in statuses)
    assert refusing.requests == {"engine-0.test": 8}, refusing.requests


def test_when_no_engine_is_at_the_version_every_engine_serves() -> None:
    load = engine_load.EngineLoad(2)
    load.set_serving([False, False])
    assert sorted(load.acquire(0.0)) == [0, 1]
    load.set_serving([False, True])
    assert load.acquire(0.0) == (1,)
    engines = FakeEngines()
    run_through_scheduler(engines, 40, serving=[False, False])
    assert engines.requests["engine-0.test"] >= 16 and engines.requests["engine-1.test"] >= 16, engines.requests
