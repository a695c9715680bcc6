"""The sync coordinator's HTTP API on loopback, with in-process fake engines: no vLLM, no model.

What is proved here is the coordinator's own part of sync safety: bodies, the trainer lease, the version ledger
across restarts and methods, dtype refusals and checkpoint confinement. tests/runtime/test_weight_sync.py proves the
same against real engines.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from explorer import config as explorer_config
from explorer import credentials
from explorer.weight_sync import api, lease, protocol, rendezvous, versions
from explorer.weight_sync.trainer import SyncRefusedError, TrainerClient
from tests.auth import trainer_headers
from tests.conftest import free_port

WEIGHTS = {"w": ("float32", [4, 4]), "ids": ("int64", [3])}
STATE = {"w": torch.ones(4, 4), "ids": torch.arange(3)}


class FakeEngine:
    """Stands in for an ``EngineDriver``: answers the routes and ``ext_*`` methods the coordinator calls."""

    def __init__(self, index: int, version: str | None = None):
        self.index = index
        self.endpoint = explorer_config.EngineEndpoint(index=index, url="http://fake", rank_offset=1 + index,
                                                       world_size=1)  # fmt: skip
        self.version = version
        self.incarnation = ""
        self.loaded: list[str] = []

    async def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        if path == "/init_weight_transfer_engine":
            self.incarnation = body["init_info"]["incarnation"] if body else ""
        elif path == "/finish_weight_update" and body:
            self.version = body["weight_version"]
        elif path == "/update_weight_version" and body:
            self.version = body["new_version"]
        return None

    async def rpc(self, method: str, *args: str, timeout: float = 30.0) -> Any:
        if method == "ext_model_dtype":
            return "float32"
        if method == "ext_validate":
            metas = [protocol.TensorMeta.model_validate(m) for m in json.loads(args[0])]
            return protocol.check_metadata(metas, WEIGHTS, "float32")
        if method == "ext_sync_state":
            return {"incarnation": self.incarnation}
        if method == "ext_load_checkpoint":
            self.loaded.append(args[0])
            return {"bytes": 0}
        return True

    async def weight_version(self) -> str | None:
        return self.version


def coordinator(tmp_path: Path, method: str = "checkpoint", engines: list[FakeEngine] | None = None,
                **kwargs: Any) -> rendezvous.SyncCoordinator:  # fmt: skip
    engines = engines if engines is not None else [FakeEngine(0), FakeEngine(1)]
    cfg = explorer_config.ExplorerConfig.model_validate({
        "job": "sync-unit", "namespace": "local",
        "rollout": {"name": "rollout", "model": {"path": "/m", "dtype": "float32"},
                    "engines": [e.endpoint.to_wire() for e in engines]},
        "taskset": {"path": "builtin:arithmetic"},
        "sync": {"method": method, "port": free_port(), "timeoutSeconds": 20,
                 "checkpointPath": str(tmp_path / "shared")},
        "experiences": {"path": str(tmp_path / "experiences"), "format": "jsonl"},
    })  # fmt: skip
    sync = rendezvous.SyncCoordinator(cfg, advertised_host="127.0.0.1", bind_host="127.0.0.1",
                                      api_port=cfg.sync.port, **kwargs)  # fmt: skip
    sync.engines = engines  # type: ignore[assignment]
    return sync


def url(sync: rendezvous.SyncCoordinator) -> str:
    return f"http://127.0.0.1:{sync.api_port}"


def serve(*syncs: rendezvous.SyncCoordinator, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run ``scenario`` while the coordinators serve (blocking trainer calls go through ``asyncio.to_thread``)."""

    async def main() -> None:
        for sync in syncs:
            await sync.start()
        try:
            await scenario()
        finally:
            for sync in syncs:
                await sync.stop()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def trainer_client(
    sync: rendezvous.SyncCoordinator, trainer_id: str | None = None
) -> AsyncIterator[TrainerClient]:
    """A real client; closed off the loop (its leave call needs the coordinator, which runs on this loop)."""
    client = TrainerClient(url(sync), trainer_id=trainer_id)
    try:
        yield client
    finally:
        await asyncio.to_thread(client.close)


def metas(**dtypes: str) -> list[dict[str, Any]]:
    return [{"name": n, "dtype": dtypes.get(n, d), "shape": s} for n, (d, s) in WEIGHTS.items()]


def test_bad_json_and_wrong_messages_are_400s_with_a_message(tmp_path: Path) -> None:
    sync = coordinator(tmp_path)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(sync), headers=trainer_headers()) as http:
            for path in ("/v1/sync/group", "/v1/sync/push", "/v1/sync/checkpoint"):
                response = await http.post(path, content=b"{not json")
                assert response.status_code == 400, (path, response.text)
                assert response.json()["error"].startswith("invalid request body: body: Invalid JSON")
            response = await http.post("/v1/sync/group", content=b"[]")
            assert response.status_code == 400 and "Input should be an object" in response.json()["error"]
            response = await http.post("/v1/sync/group", json={"tensors": [{"name": "w", "dtype": "float32"}]})
            assert response.status_code == 400 and "tensors.0.shape: Field required" in response.json()["error"]
            response = await http.post("/v1/sync/push/latest/result")
            assert response.status_code == 404  # not an int: no such route, never a 500

    serve(sync, scenario=scenario)


def test_every_trainer_route_refuses_a_missing_or_wrong_token_before_it_acts(tmp_path: Path) -> None:
    sync = coordinator(tmp_path)
    routes = [("GET", "/v1/sync"), ("POST", "/v1/sync/group"), ("POST", "/v1/sync/group/x/joined"),
              ("POST", "/v1/sync/leave"), ("POST", "/v1/sync/push"), ("POST", "/v1/sync/push/1/result"),
              ("POST", "/v1/sync/checkpoint"), ("GET", "/v1/experiences"), ("POST", "/v1/experiences/read"),
              ("POST", "/v1/experiences/ack")]  # fmt: skip
    # The job token belongs to the job's own pods: it is not a trainer's.
    presented = {"none": {}, "wrong": {"Authorization": "Bearer wrong"}, "basic": {"Authorization": "Basic eDp5"},
                 "job token": credentials.job_headers()}  # fmt: skip

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(sync)) as http:
            for who, headers in presented.items():
                for method, path in routes:
                    body = {"tensors": metas()} if method == "POST" else None
                    response = await http.request(method, path, json=body, headers=headers)
                    assert response.status_code == 401, (who, path, response.text)
                    assert "trainer-token" in response.json()["error"]
            assert sync.group is None and sync.version is None  # nothing a refused call sent took effect
            accepted = await http.post("/v1/sync/group", json={"tensors": metas()}, headers=trainer_headers())
            assert accepted.status_code == 200, accepted.text

    serve(sync, scenario=scenario)


def test_a_rotated_out_token_is_accepted_until_the_next_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "credentials"
    home.mkdir()
    for key, value in {"job-token": "j", "trainer-token": "new", "trainer-token-previous": "old"}.items():
        (home / key).write_text(value)
    monkeypatch.setenv(credentials.DIR_ENV, str(home))
    sync = coordinator(tmp_path)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(sync)) as http:
            for token, status in (("new", 200), ("old", 200), ("older", 401)):
                response = await http.get("/v1/sync", headers=credentials.bearer(token))
                assert response.status_code == status, (token, response.text)
            (home / "trainer-token-previous").write_text("new")
            (home / "trainer-token").write_text("newest")  # the next rotation: "old" is out, read at once
            assert (await http.get("/v1/sync", headers=credentials.bearer("old"))).status_code == 401
            assert (await http.get("/v1/sync", headers=credentials.bearer("newest"))).status_code == 200

    serve(sync, scenario=scenario)


def test_a_trainer_without_a_token_is_told_where_to_find_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(credentials.CLIENT_TOKEN_ENV, raising=False)
    monkeypatch.delenv(credentials.CLIENT_TOKEN_FILE_ENV, raising=False)
    with pytest.raises(credentials.MissingCredentialError, match=r"EXPLORER_SYNC_TOKEN.*trainer-token"):
        TrainerClient("127.0.0.1:1")


def test_a_body_over_the_limit_is_a_413_with_a_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "MAX_BODY_BYTES", 1 << 20)
    sync = coordinator(tmp_path)

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(sync), headers=trainer_headers()) as http:
            response = await http.post("/v1/sync/group", content=b" " * ((1 << 20) + 1024))
            assert response.status_code == 413
            assert response.json()["error"] == "request body over the 1 MiB limit"
            assert (await http.post("/v1/sync/group", json={"tensors": metas()})).status_code == 200

    serve(sync, scenario=scenario)


def test_versions_increase_across_a_restart_and_a_trainer_may_not_go_back(tmp_path: Path) -> None:
    first = coordinator(tmp_path)

    async def two_pushes() -> None:
        async with trainer_client(first) as trainer:
            assert [(await asyncio.to_thread(trainer.push, STATE)).version for _ in range(2)] == [1, 2]

    serve(first, scenario=two_pushes)
    assert versions.load_version(tmp_path / "experiences") == 2
    # Restarted engines serve the weights from disk and report no version: only the ledger remembers.
    restarted = coordinator(tmp_path)

    async def after_restart() -> None:
        assert restarted.version is None and restarted.newest_version == 2
        assert restarted.syncs == 2  # the job's pushes, not this coordinator's: sync boundaries resume where they were
        async with trainer_client(restarted) as trainer:
            with pytest.raises(SyncRefusedError, match="version 2 is not newer than the current policy version 2"):
                await asyncio.to_thread(trainer.push, STATE, 2)
            assert (await asyncio.to_thread(trainer.push, STATE)).version == 3
            assert (await asyncio.to_thread(trainer.push, STATE, 10)).version == 10

    serve(restarted, scenario=after_restart)
    assert versions.load_version(tmp_path / "experiences") == 10
    assert versions.load_pushes(tmp_path / "experiences") == 4


def test_a_broadcast_and_a_checkpoint_coordinator_of_one_job_never_share_a_version(tmp_path: Path) -> None:
    """A checkpoint push and a broadcast push once both got version 4."""
    engines = [FakeEngine(0), FakeEngine(1)]
    by_broadcast = coordinator(tmp_path, "gloo", engines)
    by_checkpoint = coordinator(tmp_path, "checkpoint", engines)
    headers = {lease.HEADER: "trainer-a", **trainer_headers()}

    async def broadcast_push(http: httpx.AsyncClient) -> int:
        group = (await http.post("/v1/sync/group", json={"tensors": metas()}, headers=headers)).json()
        assert (await http.post(f"/v1/sync/group/{group['incarnation']}/joined", headers=headers)).status_code == 200
        body = {"incarnation": group["incarnation"], "tensors": metas()}
        accepted = (await http.post("/v1/sync/push", json=body, headers=headers)).json()["version"]
        result = await http.post(f"/v1/sync/push/{accepted}/result", headers=headers)
        assert result.status_code == 200, result.text
        version: int = result.json()["version"]
        return version

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(by_broadcast), headers=trainer_headers()) as http:
            assert await broadcast_push(http) == 1
            async with trainer_client(by_checkpoint, "trainer-b") as trainer:
                assert (await asyncio.to_thread(trainer.push, STATE)).version == 2
            assert await broadcast_push(http) == 3  # its own memory says 1: the ledger says 2
            assert [e.version for e in engines] == ["3", "3"]

    serve(by_broadcast, by_checkpoint, scenario=scenario)


def test_a_second_trainer_gets_409_naming_the_holder_until_the_first_closes(tmp_path: Path) -> None:
    sync = coordinator(tmp_path)

    async def scenario() -> None:
        first = TrainerClient(url(sync), trainer_id="trainer-a@host-1")
        await asyncio.to_thread(first.push, STATE)
        async with trainer_client(sync, "trainer-b@host-2") as second:
            with pytest.raises(SyncRefusedError, match="held by trainer 'trainer-a@host-1'") as refused:
                await asyncio.to_thread(second.setup, STATE)
            assert refused.value.status == 409
            assert sync.state().extra == {"trainer": "trainer-a@host-1"}
            assert (await asyncio.to_thread(first.push, STATE)).version == 2, "the owner's group is untouched"
            await asyncio.to_thread(first.close)
            assert (await asyncio.to_thread(second.push, STATE)).version == 3
            assert sync.state().extra == {"trainer": "trainer-b@host-2"}

    serve(sync, scenario=scenario)


def test_a_silent_trainers_lease_lapses_and_it_is_then_refused_naming_the_new_holder(tmp_path: Path) -> None:
    sync = coordinator(tmp_path, lease_seconds=0.3)

    async def scenario() -> None:
        async with trainer_client(sync, "trainer-a") as first, trainer_client(sync, "trainer-b") as second:
            await asyncio.to_thread(first.push, STATE)
            await asyncio.sleep(0.4)
            assert (await asyncio.to_thread(second.push, STATE)).version == 2
            with pytest.raises(SyncRefusedError, match="held by trainer 'trainer-b'"):
                await asyncio.to_thread(first.push, STATE)

    serve(sync, scenario=scenario)


def test_metadata_in_another_dtype_than_the_served_one_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    sync = coordinator(tmp_path, "gloo")
    headers = {lease.HEADER: "trainer-a", **trainer_headers()}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(sync), headers=headers) as http:
            # The group holds what the trainer has (float64 master weights): checked as cast to the served dtype.
            group = await http.post("/v1/sync/group", json={"tensors": metas(w="float64")})
            assert group.status_code == 200 and group.json()["dtype"] == "float32"
            incarnation = group.json()["incarnation"]
            assert (await http.post(f"/v1/sync/group/{incarnation}/joined")).status_code == 200
            # A push declares what engines will stage: it must be the served dtype exactly.
            for dtype in ("float64", "bfloat16", "complex64"):
                body = {"incarnation": incarnation, "tensors": metas(w=dtype)}
                response = await http.post("/v1/sync/push", json=body)
                assert response.status_code == 422, response.text
                assert "tensor 'w'" in response.json()["error"] and dtype in response.json()["error"]
            response = await http.post(
                "/v1/sync/push", json={"incarnation": incarnation, "tensors": metas(ids="int32")}
            )
            assert response.status_code == 422 and "'ids' has dtype int32" in response.json()["error"]
        assert sync.version is None and sync.syncs == 0

    serve(sync, scenario=scenario)


def test_checkpoint_directories_outside_the_checkpoint_path_are_refused(tmp_path: Path) -> None:
    engines = [FakeEngine(0), FakeEngine(1)]
    sync = coordinator(tmp_path, engines=engines)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "model.safetensors").write_bytes(b"x")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "escape").symlink_to(outside)
    headers = {lease.HEADER: "trainer-a", **trainer_headers()}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(sync), headers=headers) as http:
            incarnation = (await http.post("/v1/sync/group", json={"tensors": metas()})).json()["incarnation"]
            for directory in (str(outside), str(tmp_path / "shared" / ".." / "elsewhere"),
                              str(tmp_path / "shared" / "escape"), "/etc"):  # fmt: skip
                body = {"incarnation": incarnation, "checkpointDir": directory}
                response = await http.post("/v1/sync/checkpoint", json=body)
                assert response.status_code == 422, response.text
                assert "not inside sync.checkpointPath" in response.json()["error"]
        assert all(e.loaded == [] for e in engines), "no engine was asked to read anything"
        async with trainer_client(sync, "trainer-a") as trainer:  # writes inside the path: served
            assert (await asyncio.to_thread(trainer.push, STATE)).engines_in_sync == 2
        assert all(Path(e.loaded[0]).parent == (tmp_path / "shared").resolve() for e in engines)

    serve(sync, scenario=scenario)


def test_a_job_without_a_checkpoint_path_takes_no_checkpoint_pushes(tmp_path: Path) -> None:
    sync = coordinator(tmp_path, "gloo")
    sync.config.sync.checkpoint_path = None

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(sync), headers=trainer_headers()) as http:
            incarnation = (await http.post("/v1/sync/group", json={"tensors": metas()})).json()["incarnation"]
            assert (await http.post(f"/v1/sync/group/{incarnation}/joined")).status_code == 200
            body = {"incarnation": incarnation, "checkpointDir": str(tmp_path)}
            response = await http.post("/v1/sync/checkpoint", json=body)
            assert response.status_code == 400 and "no sync.checkpointPath" in response.json()["error"]

    serve(sync, scenario=scenario)


def test_a_damaged_ledger_refuses_pushes_naming_the_file_but_the_coordinator_serves(tmp_path: Path) -> None:
    (tmp_path / "experiences").mkdir()
    (tmp_path / "experiences" / versions.STATE_FILE).write_text("{torn")
    sync = coordinator(tmp_path)

    async def scenario() -> None:
        async with trainer_client(sync) as trainer:
            with pytest.raises(SyncRefusedError, match=f"{versions.STATE_FILE} is not a sync state file") as refused:
                await asyncio.to_thread(trainer.push, STATE)
            assert refused.value.status == 500
        assert sync.version is None

    serve(sync, scenario=scenario)


class RecordingEngine(FakeEngine):
    """A fake engine that keeps every init info it got and every route it was sent, optionally failing one route."""

    def __init__(self, index: int, fail: str | None = None):
        super().__init__(index)
        self.inits: list[dict[str, Any]] = []
        self.posted: list[str] = []
        self.fail = fail

    async def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        self.posted.append(path.partition("?")[0])
        if self.fail and path.startswith(self.fail):
            raise httpx.ReadTimeout(f"{path} timed out")
        if path == "/init_weight_transfer_engine" and body:
            self.inits.append(body["init_info"])
        return await super().post(path, body, timeout)


def test_nccl_groups_form_from_the_trainers_unique_id_with_no_store(tmp_path: Path) -> None:
    engines = [RecordingEngine(0), RecordingEngine(1)]
    sync = coordinator(tmp_path, "nccl", engines=engines)  # type: ignore[arg-type]
    unique_id = base64.b64encode(bytes(range(128))).decode()

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(sync), headers=trainer_headers()) as http:
            info = (await http.post("/v1/sync/group", json={"tensors": metas()})).json()
            group = f"/v1/sync/group/{info['incarnation']}"
            assert info["method"] == "nccl" and "masterPort" not in info and "masterAddress" not in info
            assert not any(e.inits for e in engines), "no engine joins before the trainer has minted the id"
            early = await http.post(f"{group}/joined")
            assert early.status_code == 409 and "post the NCCL unique id first" in early.json()["error"]
            bad = await http.post(f"{group}/nccl", json={"ncclUniqueIdB64": base64.b64encode(bytes(16)).decode()})
            assert bad.status_code == 400 and "an NCCL unique id has 128" in bad.json()["error"]
            job = await http.post(
                f"{group}/nccl", json={"ncclUniqueIdB64": unique_id}, headers=credentials.job_headers()
            )
            assert job.status_code == 401, "only the trainer hands the id over"
            assert (await http.post(f"{group}/nccl", json={"ncclUniqueIdB64": unique_id})).status_code == 200
            again = await http.post(f"{group}/nccl", json={"ncclUniqueIdB64": unique_id})
            assert again.status_code == 409, "one id per group"
            assert (await http.post(f"{group}/joined")).status_code == 200
            store = await http.get(f"/v1/sync/store/{info['incarnation']}", params={"key": "0/1"})
            assert store.status_code == 409 and "without a store" in store.json()["error"]
        for engine in engines:
            (init,) = engine.inits
            assert init["nccl_unique_id_b64"] == unique_id
            assert "master_address" not in init and "master_port" not in init and "store_url" not in init
        assert [e.inits[0]["rank_offset"] for e in engines] == [1, 2]

    serve(sync, scenario=scenario)


def test_an_engine_whose_pause_times_out_is_resumed_and_keeps_its_version(tmp_path: Path) -> None:
    engines = [RecordingEngine(0), RecordingEngine(1, fail="/pause")]
    sync = coordinator(tmp_path, engines=engines)  # type: ignore[arg-type]
    (tmp_path / "shared" / "v").mkdir(parents=True)
    (tmp_path / "shared" / "v" / "model.safetensors").write_bytes(b"x")  # the fake engines read nothing

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url(sync), headers=trainer_headers()) as http:
            info = (await http.post("/v1/sync/group", json={"tensors": metas()})).json()
            pushed = await http.post(
                "/v1/sync/checkpoint",
                json={"incarnation": info["incarnation"], "checkpointDir": str(tmp_path / "shared" / "v")},
            )
            assert pushed.status_code == 200, pushed.text
        assert pushed.json()["enginesInSync"] == 1
        assert engines[1].posted[-2:] == ["/pause", "/resume"], "a pause that failed here is still resumed"
        assert engines[1].version is None and engines[0].version == str(sync.version)

    serve(sync, scenario=scenario)


class PeerEngine(RecordingEngine):
    """A fake engine that keeps a served copy: as a catch-up source it checks the store's rules while its receivers
    join, then 'sends' once they ask for the weights (the real broadcast: tests/runtime)."""

    def __init__(self, index: int, version: str | None, sync: rendezvous.SyncCoordinator | None = None,
                 fail_send: bool = False):  # fmt: skip
        super().__init__(index)
        self.version = version
        self.sync = sync
        self.fail_send = fail_send
        self.rpcs: list[str] = []
        self.store_answers: dict[str, int] = {}
        self.receiving = asyncio.Event()
        self.joined = asyncio.Event()  # as a source: it has joined its group (receivers' joins return only then)
        self.source: PeerEngine | None = None

    async def rpc(self, method: str, *args: str, timeout: float = 30.0) -> Any:
        self.rpcs.append(method)
        if method == "ext_served_metas":
            return metas()
        if method == "ext_send_served":
            plan = json.loads(args[0])
            if self.fail_send:
                raise api.SyncError(502, "engine 0 /collective_rpc: HTTP 500: the sender died")
            assert self.sync is not None
            store = f"{url(self.sync)}/v1/sync/store/{plan['incarnation']}"
            async with httpx.AsyncClient() as http:
                for who, token in (("trainer", credentials.trainer_tokens()[0]), ("job", credentials.job_token()),
                                   ("source", plan["token"])):  # fmt: skip
                    answer = await http.put(store, params={"key": "0/0"}, content=b"rank 0",
                                            headers=credentials.bearer(token))  # fmt: skip
                    self.store_answers[who] = answer.status_code
            self.joined.set()
            await asyncio.wait_for(peers_receiving(self.sync), 10)
            return {"bytes": 72}
        return await super().rpc(method, *args, timeout=timeout)

    async def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        if path == "/update_weights":
            self.receiving.set()
        if path == "/init_weight_transfer_engine" and self.source is not None:
            await asyncio.wait_for(self.source.joined.wait(), 10)
        return await super().post(path, body, timeout)


async def peers_receiving(sync: rendezvous.SyncCoordinator) -> None:
    for engine in sync.engines:
        if isinstance(engine, PeerEngine) and engine.version != str(sync.version):
            await engine.receiving.wait()


def test_an_engine_off_the_jobs_version_catches_up_from_a_peer_without_a_push(tmp_path: Path) -> None:
    engines = [PeerEngine(0, "3"), PeerEngine(1, None), PeerEngine(2, "3")]
    sync = coordinator(tmp_path, "gloo", engines=engines)  # type: ignore[arg-type]
    engines[0].sync, engines[1].source = sync, engines[0]

    async def scenario() -> None:
        assert sync.version == 3 and sync.catch_up_candidates() == [1]
        assert await sync.catch_up([1]) == [1]
        assert engines[1].version == "3" and sync.engine_versions == ["3", "3", "3"]
        assert sync.catch_ups == 1 and sync.changes == 1 and not sync.pushing
        assert await sync.catch_up([1]) == [], "nothing left to catch up"

    serve(sync, scenario=scenario)
    assert engines[0].store_answers == {"trainer": 403, "job": 403, "source": 200}, (
        "rank 0 of a catch-up group is the peer alone: not the trainer, not workflow code holding the job token"
    )
    (init,) = engines[1].inits
    assert init["incarnation"].startswith("catchup-") and init["world_size"] == 2 and init["rank_offset"] == 1
    assert engines[1].posted[-5:] == ["/pause", "/finish_weight_update", "/reset_prefix_cache", "/resume",
                                      "/shutdown_weight_transfer_engine"]  # fmt: skip
    assert "ext_send_served" not in engines[2].rpcs and engines[2].posted == [], "one source; others untouched"


def test_a_failed_catch_up_leaves_the_engine_off_the_version_and_says_why(tmp_path: Path) -> None:
    engines = [PeerEngine(0, "3", fail_send=True), PeerEngine(1, "2")]
    sync = coordinator(tmp_path, "gloo", engines=engines)  # type: ignore[arg-type]

    async def scenario() -> None:
        sync.engine_versions = ["3", "2"]  # engine 1 failed to apply version 3
        sync.version = 3
        assert await sync.catch_up([1]) == []
        assert sync.engine_versions == ["3", "2"] and sync.catch_ups == 0 and not sync.pushing
        assert sync.last_error and "could not catch up to version 3" in sync.last_error
        assert "the sender died" in sync.last_error

    serve(sync, scenario=scenario)
    assert "ext_abort_update" in engines[1].rpcs and "/finish_weight_update" not in engines[1].posted


@pytest.mark.parametrize(("method", "enabled"), [("nccl", True), ("gloo", False)])
def test_no_catch_up_where_engines_keep_no_copy_or_it_is_turned_off(tmp_path: Path, method: str,
                                                                    enabled: bool) -> None:  # fmt: skip
    engines = [PeerEngine(0, "3"), PeerEngine(1, None)]
    sync = coordinator(tmp_path, method, engines=engines)  # type: ignore[arg-type]
    sync.config.sync = sync.config.sync.model_copy(update={"catch_up": enabled})

    async def scenario() -> None:
        assert sync.catch_up_candidates() == [] and await sync.catch_up([1]) == []

    serve(sync, scenario=scenario)
    assert "ext_send_served" not in engines[0].rpcs


def test_a_restarted_coordinator_adopts_the_newest_version_its_engines_serve(tmp_path: Path) -> None:
    """Engines that disagree (one failed an apply, one restarted): the job is at the newest; the others catch up."""
    sync = coordinator(tmp_path, "gloo", engines=[FakeEngine(0, "4"), FakeEngine(1, "5"), FakeEngine(2, None)])

    async def scenario() -> None:
        assert sync.version == 5 and sync.engines_in_sync == 1 and sync.catch_up_candidates() == [0, 2]

    serve(sync, scenario=scenario)
