"""Live membership's pure parts: reading the engines from a rewritten config, resizing the load picture and the pools,
and the sync coordinator taking the new engines (real engines and runners: tests/runtime/test_weight_sync.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import yaml

from explorer import config as explorer_config
from explorer import engine_load, inference, membership
from tests.unit.test_sync_coordinator import FakeEngine, coordinator, metas, serve, trainer_headers, url


def config_text(urls: list[str]) -> str:
    return yaml.safe_dump({
        "job": "j", "namespace": "n", "taskset": {"path": "builtin:arithmetic"},
        "rollout": {"name": "rollout", "model": {"path": "/m"},
                    "engines": [{"index": i, "url": u, "rankOffset": 1 + i, "worldSize": 1}
                                for i, u in enumerate(urls)]},
    })  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    async def set_rollout_engines(self, endpoints: list[explorer_config.EngineEndpoint]) -> bool:
        self.seen.append([e.url for e in endpoints])
        return True


def test_the_follower_hands_over_each_changed_engine_list_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "explorer.yaml"
    path.write_text(config_text(["http://e-0"]))
    recorder = Recorder()

    async def scenario() -> None:
        follower = asyncio.create_task(membership.follow_config(recorder, path, period=0.01))
        for text in (config_text(["http://e-0", "http://e-1"]), "rollout: [not, a, config", config_text([]),
                     config_text(["http://e-0"])):  # fmt: skip
            await asyncio.sleep(0.1)
            path.write_text(text)
        await asyncio.sleep(0.1)
        follower.cancel()

    asyncio.run(scenario())
    assert recorder.seen == [["http://e-0"], ["http://e-0", "http://e-1"], ["http://e-0"]], (
        "a broken file and a scale to zero leave the engines as they were"
    )


def test_the_load_picture_keeps_the_engines_that_stay_and_adds_new_ones_out_of_the_rotation() -> None:
    load = engine_load.EngineLoad(2)
    load.outstanding, load.dispatched = [3, 1], [30, 10]
    load.resize(4, serving=False)
    assert load.outstanding == [3, 1, 0, 0] and load.serving == [True, True, False, False]
    assert all(load.acquire(now=0.0)[0] < 2 for _ in range(8)), "added engines wait until they serve the version"
    load.resize(1, serving=False)
    assert load.outstanding[0] >= 3 and len(load.serving) == 1 and load.acquire(now=0.0) == (0,)


def test_a_pool_keeps_the_clients_of_engines_that_stay() -> None:
    async def scenario() -> None:
        pool = inference.EnginePool.from_urls(["http://e-0", "http://e-1"], "tiny",
                                              transport=httpx.MockTransport(lambda r: httpx.Response(500)))  # fmt: skip
        first = pool.engines[0]
        pool.set_urls(["http://e-0", "http://e-1", "http://e-2"])
        assert pool.engines[0] is first and [e.base_url for e in pool.engines][-1] == "http://e-2"
        pool.set_urls(["http://e-0"])
        assert pool.engines == [first] and pool.order((1, 0), exclusive=True) == [0]
        await pool.close()

    asyncio.run(scenario())


def test_the_coordinator_takes_new_engines_between_pushes_and_the_trainers_group_must_re_form(tmp_path: Path) -> None:
    engines = [FakeEngine(0, "4"), FakeEngine(1, "4")]
    sync = coordinator(tmp_path, "gloo", engines=engines)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(sync), headers=trainer_headers()) as http:
            info = (await http.post("/v1/sync/group", json={"tensors": metas()})).json()
            added = explorer_config.EngineEndpoint(index=2, url="http://added", rank_offset=3, world_size=1)
            await sync.set_engines([e.endpoint for e in engines] + [added])
            assert sync.engines[:2] == engines and sync.engines[2].endpoint == added
            assert sync.engine_versions == ["4", "4", None] and sync.engines_in_sync == 2 and sync.scales == 1
            assert sync.catch_up_candidates() == [2], "the added engine is caught up from a peer"
            push = await http.post("/v1/sync/push", json={"incarnation": info["incarnation"], "tensors": metas()})
            assert push.status_code == 409 and "scaled from 2 to 3 engines" in push.json()["error"]
            assert "form a new group" in push.json()["error"], "what TrainerClient.push re-forms on"
            await sync.set_engines([engines[0].endpoint])
            assert [e.index for e in sync.engines] == [0] and sync.engine_versions == ["4"]

    serve(sync, scenario=scenario)
